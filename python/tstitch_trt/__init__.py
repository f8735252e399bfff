"""tstitch-trt: T-Stitch (trajectory stitching) diffusion sampling on TensorRT / ONNX Runtime step engines."""

__version__ = "0.1.0"
