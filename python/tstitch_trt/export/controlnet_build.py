"""`build --controlnet`: the ControlNet's part of an SD / SDXL bundle.

The ControlNet has no engine of its own: it is exported inside every U-Net step graph
(export/unet_step.py), so one launch is still one whole step and the trajectory stays one capturable
graph. What the bundle keeps apart is its diffusers directory for the torch backend, and the facts
the runtime needs: manifest conditioning.controlnet = {source, family, conditioning_channels, engines}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from tstitch_trt.export.torch_dirs import save_model_dir
from tstitch_trt.models.controlnet import ControlNetSource, check_controlnet, load_controlnet, resolve_controlnet

CONTROLNET_DIR = "controlnet/diffusers"


def prepare_controlnet(spec: str, unets: list[tuple[str, dict[str, Any]]], vae_factor: int
                       ) -> tuple[ControlNetSource, nn.Module]:
    """Resolve, check against every U-Net (name, config) and load, before anything is written."""
    from tstitch_trt.models.preflight import available_memory_bytes, check_fits_memory, check_weights_dir

    source = resolve_controlnet(spec)
    # config-only checks first (size, then fit to the U-Nets), then the weights files
    check_fits_memory([(f"--controlnet {spec}: config.json", source.config)], available_memory_bytes())
    check_controlnet(source, unets, vae_factor)
    check_weights_dir(source.root, f"the ControlNet weights of --controlnet {spec}")
    return source, load_controlnet(source.root)


def controlnet_entry(tmp: Path, source: ControlNetSource, net: nn.Module, backends: list[str],
                     batch_range: tuple[int, int]) -> dict[str, Any]:
    """The manifest's conditioning.controlnet; the torch backend gets the diffusers directory."""
    engines = {}
    if "torch" in backends:
        # loaded unchanged from source.root: its one safetensors file is hard-linked where it can be (the real SD
        # 1.5 ControlNet is 1.4 GB written again otherwise), saved unsharded where not (export/torch_dirs.py)
        engines["torch"] = save_model_dir(net, tmp, CONTROLNET_DIR, source.root, batch_range=batch_range)
    return {"source": str(source.spec), "family": source.family,
            "conditioning_channels": source.conditioning_channels, "engines": engines}
