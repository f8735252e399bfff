"""The ControlNet flags of `tstitch-trt build` and `run` (diffusers' names and defaults)."""

from __future__ import annotations

import argparse

from tstitch_trt.argtypes import finite, unit
from tstitch_trt.errors import UserError

RUN_FLAGS = ("control_image", "controlnet_scale", "guess_mode", "control_guidance_start", "control_guidance_end")


def add_build_flags(b: argparse.ArgumentParser) -> None:
    b.add_argument("--controlnet", help="SD: a diffusers ControlNetModel directory (or hub id where a network exists) "
                                        "run inside every U-Net step graph")


def add_run_flags(r: argparse.ArgumentParser) -> None:
    r.add_argument("--control-image", help="ControlNet bundles: the conditioning image (RGB, the output size; it sets "
                                           "--height/--width when those are not given)")
    r.add_argument("--controlnet-scale", type=finite, default=None,
                   help="ControlNet: residual scale (diffusers' controlnet_conditioning_scale, default 1.0)")
    r.add_argument("--guess-mode", action="store_true", default=None,
                   help="ControlNet: diffusers' guess mode (no residuals on the unconditional half, scaled by depth)")
    r.add_argument("--control-guidance-start", type=unit, default=None,
                   help="ControlNet: share of U-Net calls before it starts acting, 0..1 (default 0)")
    r.add_argument("--control-guidance-end", type=unit, default=None,
                   help="ControlNet: share of U-Net calls after which it stops acting, 0..1 (default 1)")


def refuse_controlnet_build(args: argparse.Namespace) -> None:
    """DiT builds take no ControlNet."""
    if getattr(args, "controlnet", None):
        raise UserError("--controlnet applies to SD builds (diffusers --model directories); DiT bundles take none")


def control_request(args: argparse.Namespace, has_controlnet: bool,
                    max_size: tuple[int, int] | None = None):  # -> ControlRequest | None
    """The run's ControlNet request from its flags: ControlNet flags on a bundle without one, or settings
    without --control-image, are one line (a ControlNet bundle without an image: pipeline.control)."""
    from tstitch_trt.pipeline.control import (
        DEFAULT_CONTROLNET_SCALE,
        DEFAULT_GUIDANCE_END,
        DEFAULT_GUIDANCE_START,
        ControlRequest,
        read_control_image,
    )

    given = [f for f in RUN_FLAGS if getattr(args, f) is not None]
    if given and not has_controlnet:
        raise UserError(f"--{given[0].replace('_', '-')} needs a bundle built with --controlnet; this bundle has no "
                        "ControlNet")
    if args.control_image is None:
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} sets up a ControlNet; give --control-image FILE with it")
        return None
    return ControlRequest(
        read_control_image(args.control_image, **({"max_size": max_size} if max_size else {})),
        scale=DEFAULT_CONTROLNET_SCALE if args.controlnet_scale is None else args.controlnet_scale,
        guess_mode=bool(args.guess_mode),
        start=DEFAULT_GUIDANCE_START if args.control_guidance_start is None else args.control_guidance_start,
        end=DEFAULT_GUIDANCE_END if args.control_guidance_end is None else args.control_guidance_end)
