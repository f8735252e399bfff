"""The built-in demo pair (see the demo issue): until it ships, say how to get a bundle."""

from __future__ import annotations

from pathlib import Path

from tstitch_trt.errors import UserError

DEMO_DIR = Path(__file__).parent / "pair"


def demo_bundle_dir() -> Path:
    if (DEMO_DIR / "manifest.json").is_file():
        return DEMO_DIR
    raise UserError(
        "the built-in demo pair is not installed; build a bundle with "
        "`tstitch-trt build --model DiT-S/2=CKPT --model DiT-XL/2=CKPT --out engines/dit` "
        "and run it with --bundle engines/dit"
    )
