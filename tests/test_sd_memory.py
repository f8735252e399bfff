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


# An SDXL pair at its real size (benchmarks/RESULTS.md, real sizes): the ORT graphs' bytes per artifact (SSD-1B,
# SDXL U-Net step graphs, CLIP-L, OpenCLIP-bigG, VAE decoder), on a 24 GB machine with 18 GiB available
SDXL_ORT_BYTES = [5_265_000_000, 10_270_000_000, 492_000_000, 2_780_000_000, 198_000_000]
GiB = 2**30


def _sdxl_at_real_size(sdxl_bundle, monkeypatch, available: int):
    """The tiny SDXL bundle's manifest with the real U-Net configs, its files seen at their real sizes."""
    from tstitch_trt.models.real_configs import SSD_1B_UNET
    from tstitch_trt.runtime import host_memory

    manifest = read_manifest(sdxl_bundle)
    for m, arch in zip(manifest.models, (SSD_1B_UNET, SDXL_UNET), strict=True):
        m.arch = dict(arch)
    monkeypatch.setattr(resources, "_artifact_bytes", lambda *a: list(SDXL_ORT_BYTES))
    monkeypatch.setattr(host_memory, "ort_graph_bytes", lambda *a: sum(SDXL_ORT_BYTES))
    monkeypatch.setattr(host_memory, "mem_total", lambda: 24 * 10**9)
    monkeypatch.setattr(resources, "available_memory_bytes", lambda: available)
    return manifest


def test_real_size_sdxl_fits_in_the_low_memory_modes_only(sdxl_bundle, monkeypatch):
    """19.5 GB of graphs on a 24 GB machine: ORT with mapped weights and OpenVINO compiling one model at a time (the
    largest model, 10.3 GB, resident at once) fit in 18 GiB; ORT packed or OpenVINO with every model compiled (a
    copy of every weight) are refused, in one line, before anything loads."""
    from tstitch_trt.errors import UserError
    from tstitch_trt.runtime.openvino_backend import ONE_MODEL_ENV
    from tstitch_trt.runtime.ort_backend import MAP_WEIGHTS_ENV, maps_weights

    manifest = _sdxl_at_real_size(sdxl_bundle, monkeypatch, 18 * GiB)
    monkeypatch.delenv(MAP_WEIGHTS_ENV, raising=False)
    monkeypatch.delenv(ONE_MODEL_ENV, raising=False)
    assert maps_weights(sdxl_bundle, manifest)
    for backend in ("ort", "openvino"):
        assert resources.resident_weight_bytes(sdxl_bundle, manifest, backend) == max(SDXL_ORT_BYTES)
        resources.check_sd_fits(sdxl_bundle, manifest, [backend], 1, 1024, 1024)  # fits: no error
    monkeypatch.setenv(ONE_MODEL_ENV, "0")
    with pytest.raises(UserError, match=r"needs about 2\d\.\d GiB of memory on openvino \(1024x1024, batch 1\)"):
        resources.check_sd_fits(sdxl_bundle, manifest, ["openvino"], 1, 1024, 1024)
    monkeypatch.setenv(MAP_WEIGHTS_ENV, "0")  # packed
    assert resources.resident_weight_bytes(sdxl_bundle, manifest, "ort") == sum(SDXL_ORT_BYTES)
    with pytest.raises(UserError, match="on ort"):
        resources.check_sd_fits(sdxl_bundle, manifest, ["ort"], 1, 1024, 1024)
    # mapped, yet less memory than one U-Net call needs (10.3 GB of its weights + its activations): refused
    monkeypatch.delenv(MAP_WEIGHTS_ENV)
    _sdxl_at_real_size(sdxl_bundle, monkeypatch, 12 * GiB)
    with pytest.raises(UserError, match="on ort"):
        resources.check_sd_fits(sdxl_bundle, manifest, ["ort"], 1, 1024, 1024)


def test_weights_are_mapped_only_when_the_graphs_are_over_half_the_memory(sd_bundle, monkeypatch):
    from tstitch_trt.runtime import host_memory, ort_backend

    manifest = read_manifest(sd_bundle)
    size = host_memory.ort_graph_bytes(sd_bundle, manifest)
    assert size > 0
    monkeypatch.delenv(ort_backend.MAP_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(host_memory, "mem_total", lambda: 2 * size + 2)
    assert not ort_backend.maps_weights(sd_bundle, manifest)
    monkeypatch.setattr(host_memory, "mem_total", lambda: 2 * size - 2)
    assert ort_backend.maps_weights(sd_bundle, manifest)
    monkeypatch.setenv(ort_backend.MAP_WEIGHTS_ENV, "0")
    assert not ort_backend.maps_weights(sd_bundle, manifest)


def test_a_mapped_weights_run_equals_the_packed_one(sd_bundle, monkeypatch):
    """The mapped mode changes where the weights live, not the numbers; it says so in the run's notes."""
    import numpy as np

    from tstitch_trt.pipeline.sd import StitchedSDPipeline
    from tstitch_trt.runtime.ort_backend import MAP_WEIGHTS_ENV

    latents, notes = {}, {}
    for mode in ("0", "1"):
        monkeypatch.setenv(MAP_WEIGHTS_ENV, mode)
        pipe = StitchedSDPipeline.from_bundle(sd_bundle, backend="ort")
        assert pipe.backend.mapped_weights == (mode == "1")
        res = pipe(prompt="a cat", steps=3, ratio=0.5, seed=1)
        latents[mode], notes[mode] = res.latents, res.report["notes"]
        pipe.backend.close()
    assert np.abs(latents["1"] - latents["0"]).max() <= 1e-5 * np.abs(latents["0"]).max()
    assert any("memory-mapped" in n for n in notes["1"]) and not any("memory-mapped" in n for n in notes["0"])


def test_openvino_one_model_at_a_time_equals_every_model_compiled(sd_bundle, monkeypatch):
    """The low-memory mode compiles each step model at its first call and releases the other (text encoders after
    encoding, step models before decoding): the same latents, twice in a row, and the notes say so."""
    import numpy as np

    pytest.importorskip("openvino")
    from tstitch_trt.pipeline.sd import StitchedSDPipeline
    from tstitch_trt.runtime.openvino_backend import ONE_MODEL_ENV

    monkeypatch.setenv("TSTITCH_OPENVINO_CACHE", str(sd_bundle.parent / "ov-cache-one-model"))
    latents = {}
    for mode in ("0", "1"):
        monkeypatch.setenv(ONE_MODEL_ENV, mode)
        pipe = StitchedSDPipeline.from_bundle(sd_bundle, backend="openvino", precision="fp32")
        assert pipe.backend.one_model_at_a_time == (mode == "1")
        for _ in range(2):
            res = pipe(prompt="a cat", steps=3, ratio=0.5, seed=1)
            latents.setdefault(mode, []).append(res.latents)
        if mode == "1":
            assert pipe.backend.compiled == [None, None] and pipe._text_encoder is None
            assert pipe.backend.compiles == 4  # each model once per trajectory
            assert any("one model in memory at a time" in n for n in res.report["notes"])
        pipe.backend.close()
    ref = latents["0"][0]
    for got in latents["0"][1:] + latents["1"]:
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
