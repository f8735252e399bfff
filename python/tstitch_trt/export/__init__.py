"""StepModule, ONNX export, engine builders and the torch backend (needs torch)."""
