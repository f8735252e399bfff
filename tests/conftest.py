"""Shared fixtures: tiny stitch pairs with every parameter randomized (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_OVERRIDES = {
    "DiT-S/2": {"depth": 2, "hidden_size": 64, "num_heads": 2},
    "DiT-B/2": {"depth": 3, "hidden_size": 96, "num_heads": 4},
    "DiT-XL/2": {"depth": 4, "hidden_size": 128, "num_heads": 4},
}


def build_tiny(out: Path, archs: list[str], backends: list[str], **kw) -> Path:
    from tstitch_trt.export.build import BuildConfig, ModelSpec, build_bundle

    cfg = BuildConfig(
        models=[ModelSpec(a, f"random:{i + 1}") for i, a in enumerate(archs)],
        out=out, backends=backends, image_size=64, num_classes=10,
        arch_overrides={a: TINY_OVERRIDES[a] for a in archs}, **kw,
    )
    build_bundle(cfg)
    return out


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> Path:
    """DiT-S/2 -> DiT-B/2 (shrunk), latent 4x8x8, 10 classes, torch + ort (fp32)."""
    return build_tiny(tmp_path_factory.mktemp("bundles") / "pair", ["DiT-S/2", "DiT-B/2"], ["torch", "ort"])


@pytest.fixture(scope="session")
def tiny_trio(tmp_path_factory) -> Path:
    """DiT-S/2 -> DiT-B/2 -> DiT-XL/2 (shrunk), torch + ort."""
    return build_tiny(tmp_path_factory.mktemp("bundles") / "trio", ["DiT-S/2", "DiT-B/2", "DiT-XL/2"],
                      ["torch", "ort"])


def tiny_sd_parts(writer: str, root: Path, **kw):
    """What models/sd_random's `writer` (save_tiny_pair, save_tiny_control_set, ...) writes under `root`: diffusers'
    dummy parts, every parameter random. Skips, with the reason, where the SD stack or the CLIP vocabulary is
    missing (scripts/test.sh installs both)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from tstitch_trt.models import sd_random

    if not sd_random.open_clip_vocab_file().is_file():
        pytest.skip("open_clip_torch's vocabulary file is missing (pip install --no-deps open_clip_torch)")
    return getattr(sd_random, writer)(root, **kw)


def build_sd(out: Path, models: list[Path], *flags: str, backends: str = "torch,ort") -> Path:
    """`tstitch-trt build` of diffusers parts (smallest first) into `out`, through the CLI."""
    from tstitch_trt.cli import main

    model_args = [a for m in models for a in ("--model", str(m))]
    assert main(["build", *model_args, *flags, "--backend", backends, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def sd_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(small bare U-Net dir, large SD pipeline dir)."""
    return tiny_sd_parts("save_tiny_pair", tmp_path_factory.mktemp("sd-parts"))


@pytest.fixture(scope="session")
def sd_bundle(sd_pair, tmp_path_factory) -> Path:
    """The tiny SD pair built once: torch + ort."""
    return build_sd(tmp_path_factory.mktemp("sd-bundles") / "sd", list(sd_pair))


@pytest.fixture(scope="session")
def control_set(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(small U-Net dir, large SD pipeline dir, ControlNet dir); the small U-Net shares the large one's residual
    layout so the ControlNet feeds both."""
    return tiny_sd_parts("save_tiny_control_set", tmp_path_factory.mktemp("control-parts"))


@pytest.fixture(scope="session")
def control_bundle(control_set, tmp_path_factory) -> Path:
    """The tiny SD pair with the tiny ControlNet, built once: torch + ort."""
    small, large, net = control_set
    return build_sd(tmp_path_factory.mktemp("control-bundles") / "sd-control", [small, large], "--controlnet", str(net))


@pytest.fixture(scope="session")
def sdxl_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(small bare SDXL U-Net dir, large StableDiffusionXLPipeline dir) (models/sd_random.save_tiny_sdxl_pair)."""
    return tiny_sd_parts("save_tiny_sdxl_pair", tmp_path_factory.mktemp("sdxl-parts"))


@pytest.fixture(scope="session")
def sdxl_bundle(sdxl_pair, tmp_path_factory) -> Path:
    """The tiny SDXL pair built once: torch + ort."""
    return build_sd(tmp_path_factory.mktemp("sdxl-bundles") / "sdxl", list(sdxl_pair))


@pytest.fixture(scope="session")
def sdxl_control_set(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(small SDXL U-Net dir, large SDXL pipeline dir, SDXL ControlNet dir) (save_tiny_sdxl_control_set)."""
    return tiny_sd_parts("save_tiny_sdxl_control_set", tmp_path_factory.mktemp("sdxl-control-parts"))


@pytest.fixture(scope="session")
def sdxl_control_bundle(sdxl_control_set, tmp_path_factory) -> Path:
    """The tiny SDXL pair with the tiny SDXL ControlNet, built once: torch + ort."""
    small, large, net = sdxl_control_set
    return build_sd(tmp_path_factory.mktemp("sdxl-control-bundles") / "sdxl-control", [small, large],
                    "--controlnet", str(net))


@pytest.fixture(scope="session")
def lcm_bundle(tmp_path_factory) -> Path:
    """A tiny LCM pair (large U-Net with the guidance embedding, small without), ort only."""
    root = tmp_path_factory.mktemp("lcm-bundles")
    return build_sd(root / "bundle", list(tiny_sd_parts("save_tiny_pair", root, lcm=True)), backends="ort")
