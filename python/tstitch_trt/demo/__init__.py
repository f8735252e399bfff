"""The built-in demo pair: DiT-Demo-S/4 -> DiT-Demo-L/4, pixel-space MNIST digits (32x32, 10 classes).

The bundle ships in demo/pair/ (manifest.json, safetensors for torch, ONNX for ORT, and eval/ with
the quality evaluator's classifier and held-out digits). `python -m tstitch_trt.demo.train` trains
and rebuilds it. This module imports without torch: the runtime only needs the files.
"""

from __future__ import annotations

from pathlib import Path

from tstitch_trt.errors import UserError

DEMO_DIR = Path(__file__).parent / "pair"
DEMO_NAME = "demo"  # what --bundle takes for this pair


def demo_bundle_dir() -> Path:
    if (DEMO_DIR / "manifest.json").is_file():
        return DEMO_DIR
    raise UserError(
        f"the built-in demo pair is missing from {DEMO_DIR}; rebuild it with `python -m tstitch_trt.demo.train` "
        "(needs the build and demo-train extras), or run your own bundle with --bundle DIR"
    )


def resolve_bundle(name: str | Path | None) -> Path:
    """--bundle's value as a directory: 'demo' (or nothing) is the built-in pair, anything else a path."""
    if name is None or str(name) == DEMO_NAME:
        return demo_bundle_dir()
    return Path(name)
