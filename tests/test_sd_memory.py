"""A text-to-image run that cannot fit in memory is refused up front, in one line, before any weights load."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")

from tstitch_trt.bundle.manifest import read_manifest  # noqa: E402
from tstitch_trt.cli import main  # noqa: E402
from tstitch_trt.models.real_configs import SD15_UNET, SDXL_UNET  # noqa: E402
from tstitch_trt.pipeline import resources  # noqa: E402


def test_refused_before_loading_when_weights_do_not_fit(sd_bundle, monkeypatch, capsys, tmp_path):
    need = resources.backend_file_bytes(sd_bundle, read_manifest(sd_bundle), "ort")
    assert need > 0
    monkeypatch.setattr(resources, "available_memory_bytes", lambda: 1024)
    opened = []
    import tstitch_trt.pipeline.backends as backends

    monkeypatch.setattr(backends, "open_backend", lambda *a, **k: opened.append(a) or pytest.fail("loaded"))
    rc = main(["run", "--bundle", str(sd_bundle), "--backend", "ort", "--prompt", "a cat", "--steps", "2",
               "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and opened == [] and not (tmp_path / "o.png").exists()
    assert len(err) == 1 and "GiB of memory on ort" in err[0] and "only 0.0 GiB is available" in err[0]


def test_runs_when_it_fits(sd_bundle, tmp_path):
    assert main(["run", "--bundle", str(sd_bundle), "--backend", "ort", "--prompt", "a cat", "--steps", "2",
                 "--out", str(tmp_path / "o.png")]) == 0


def test_activation_estimate_at_real_sizes():
    """SD 1.5 at 512 px: 8 heads x 4096^2 fp32 scores, CFG batch 2, scores + softmax, x2 arena = 4 GiB;
    SDXL at 1024 px: its first attention level is 64x64 with 10 heads of 64 = 5 GiB."""
    assert resources.unet_activation_bytes(SD15_UNET, 1, 512, 512) == 2 * 2 * 8 * 4096**2 * 4 * 2
    assert resources.unet_activation_bytes(SDXL_UNET, 1, 1024, 1024) == 2 * 2 * 10 * 4096**2 * 4 * 2
