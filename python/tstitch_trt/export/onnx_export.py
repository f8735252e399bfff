"""Export a StepModule to an ONNX step graph (DESIGN.md: one engine launch = one sampling step).

fp32: for ONNX Runtime on the CPU and as the accuracy reference.
fp16: the network's weights and matmuls are fp16-typed in the graph itself (TensorRT 10.12+
deprecates and 11 removes BuilderFlag.FP16: engines are strongly typed); x, x0, guidance, coef,
the sampler update, LayerNorm and softmax statistics stay fp32.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch

from tstitch_trt.export.step_module import STEP_INPUTS, STEP_OUTPUTS, StepModule
from tstitch_trt.sampling.coefficients import NUM_COEFS

OPSET = 18
TWO_GB = 2**31 - 1


def example_inputs(step: StepModule, batch: int = 2) -> tuple[torch.Tensor, ...]:
    cfg = step.denoiser.config
    lat = (batch, cfg.in_channels, cfg.input_size, cfg.input_size)
    return (
        torch.randn(lat),
        torch.full((batch,), 500, dtype=torch.int64),
        torch.zeros(batch, dtype=torch.int64),
        torch.tensor(1.5),
        torch.rand(NUM_COEFS),
        torch.randn(lat),
        torch.randn(lat),
    )


def io_spec(step: StepModule) -> dict:
    """Names, shapes ('B' = dynamic batch) and dtypes of the step graph, for the manifest."""
    cfg = step.denoiser.config
    lat = ["B", cfg.in_channels, cfg.input_size, cfg.input_size]
    return {
        "inputs": {
            "x": {"shape": lat, "dtype": "float32"},
            "t": {"shape": ["B"], "dtype": "int64"},
            "y": {"shape": ["B"], "dtype": "int64"},
            "guidance": {"shape": [], "dtype": "float32"},
            "coef": {"shape": [NUM_COEFS], "dtype": "float32"},
            "prev_x0": {"shape": lat, "dtype": "float32"},
            "noise": {"shape": lat, "dtype": "float32"},
        },
        "outputs": {"x_next": {"shape": lat, "dtype": "float32"}, "x0": {"shape": lat, "dtype": "float32"}},
    }


def export_step_graph(step: StepModule, path: str | Path, precision: str = "fp32") -> Path:
    """Write the step graph to `path` (external data beside it when over 2 GB) and return it."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[precision]
    step = copy.deepcopy(step).to(dtype)  # never mutate the caller's module
    batch_dim = {0: "B"}
    dynamic_axes = {"x": batch_dim, "t": batch_dim, "y": batch_dim, "prev_x0": batch_dim, "noise": batch_dim,
                    "x_next": batch_dim, "x0": batch_dim}
    tmp = path.with_suffix(".raw.onnx")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            step.eval(),
            example_inputs(step),
            str(tmp),
            input_names=list(STEP_INPUTS),
            output_names=list(STEP_OUTPUTS),
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    model = onnx.load(str(tmp))
    tmp.unlink()
    model = clean_graph(model)
    large = model.ByteSize() > TWO_GB if _fits_proto(model) else True
    if large:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data")
        onnx.checker.check_model(str(path))
    else:
        onnx.save_model(model, str(path))
        onnx.checker.check_model(model)
    return path


def clean_graph(model):  # onnx.ModelProto -> onnx.ModelProto
    """Constant folding, dead-node removal, topological sort (onnx-graphsurgeon), shape inference."""
    import onnx
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    graph.fold_constants().cleanup().toposort()
    cleaned = gs.export_onnx(graph)
    cleaned.opset_import[0].version = model.opset_import[0].version
    if _fits_proto(cleaned):
        cleaned = onnx.shape_inference.infer_shapes(cleaned)
    return cleaned


def _fits_proto(model) -> bool:
    try:
        return model.ByteSize() < TWO_GB
    except ValueError:  # protobuf refuses to size messages over 2 GB
        return False
