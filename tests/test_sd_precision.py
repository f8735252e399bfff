"""`--precision auto|fp32|bf16` on text-to-image bundles: U-Nets, text encoder(s) and VAE, each by its own verdict.

On the tiny random SD / SDXL bundles (conftest): a precision request must change what runs (bf16 differs
from fp32, fp32 equals torch), reach every part (the report names each part's precision), and bf16 must
stay finite and within the tolerance measured below.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

ov = pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install '.[openvino]')")

from tstitch_trt.bundle.manifest import read_manifest  # noqa: E402
from tstitch_trt.cli import main  # noqa: E402
from tstitch_trt.runtime.cpu_isa import bf16_isa  # noqa: E402
from tstitch_trt.runtime.openvino_backend import cpu_has_bf16  # noqa: E402
from tstitch_trt.runtime.openvino_precision import runtime_precisions  # noqa: E402

needs_bf16 = pytest.mark.skipif(not cpu_has_bf16(ov.Core()), reason="this CPU has no native bf16 (AVX512_BF16 / AMX)")
# measured on the tiny random SD bundle (OpenVINO 2026.4.1, AMD EPYC, AVX512-BF16, no AMX), bf16 vs torch fp32:
# PNDM 4 steps (5 U-Net calls) latents max rel 0.109 (one U-Net step: 0.071, where torch's own bf16 autocast
# gives 0.11); one text-encoder call 0.012, one VAE decode 0.013 (check --precision bf16). Random weights; the
# bounds leave ~3-4x for other kernels (AMX).
BF16_LATENT_MAX_REL = 0.35
BF16_PART_MAX_REL = 0.05


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    assert np.isfinite(got).all(), "bf16 gave NaN/Inf"
    return float(np.max(np.abs(got.astype(np.float64) - ref))) / float(np.max(np.abs(ref)))


def _run(pipe, **kw):
    return pipe(prompt="a red cube", ratio=0.5, steps=4, sampler="pndm", seed=0, decode=False, **kw)


@needs_bf16
def test_every_part_runs_the_precision_asked(sd_bundle):
    from tstitch_trt.pipeline.sd import StitchedSDPipeline

    ref = StitchedSDPipeline.from_bundle(sd_bundle, backend="torch")
    fp32 = StitchedSDPipeline.from_bundle(sd_bundle, backend="openvino", precision="fp32")
    bf16 = StitchedSDPipeline.from_bundle(sd_bundle, backend="openvino", precision="bf16")
    parts = ["small-unet", "large-pipeline", "text encoder", "VAE decoder"]
    assert list(fp32.precisions) == parts and set(fp32.precisions.values()) == {"fp32"}
    assert set(bf16.precisions.values()) == {"bf16"}
    r_ref, r32, r16 = _run(ref), _run(fp32), _run(bf16)
    assert _rel(r32.latents, r_ref.latents) < 1e-4  # fp32 is torch's trajectory
    err = _rel(r16.latents, r_ref.latents)
    assert 1e-3 < err < BF16_LATENT_MAX_REL, f"bf16 latents max rel {err:.3g}"  # bf16 really ran, and stayed close
    assert r16.report["precisions"] == bf16.precisions and r32.report["precisions"] == fp32.precisions
    assert any(n.startswith("openvino precision (text encoders, VAE): bf16 (requested)") for n in r16.report["notes"])
    # the U-Nets' compiled models: bf16 in the body, the timestep embedding fp32
    rows = [r for c in bf16.backend.compiled for r in runtime_precisions(c)]
    assert {p for k, p, _ in rows if k in ("Convolution", "FullyConnected")} == {"bf16"}
    assert {p for k, p, names in rows if any("time_proj/Mul" in n for n in names)} == {"f32"}
    # text encoder and VAE: each differs from fp32 in bf16, within the bound of torch fp32
    ids = np.tile(np.arange(77, dtype=np.int64) % 50, (2, 1))
    from tstitch_trt.pipeline.text_encoder import open_text_encoder
    from tstitch_trt.pipeline.vae import open_decoder

    manifest = read_manifest(sd_bundle)
    te = {p: open_text_encoder(sd_bundle, manifest, b, p)(ids) for b, p in
          (("torch", "fp32"), ("openvino", "fp32"), ("openvino", "bf16"))}
    assert _rel(te["fp32"], te["fp32"]) == 0 and 1e-3 < _rel(te["bf16"], te["fp32"]) < BF16_PART_MAX_REL
    z = np.random.default_rng(0).standard_normal((1, *manifest.latent_shape), dtype=np.float32)
    ref_img = open_decoder(sd_bundle, manifest, "torch")(z)
    assert _rel(open_decoder(sd_bundle, manifest, "openvino", "fp32")(z), ref_img) < 1e-4
    assert 1e-3 < _rel(open_decoder(sd_bundle, manifest, "openvino", "bf16")(z), ref_img) < BF16_PART_MAX_REL
    for p in (ref, fp32, bf16):
        p.close()


@needs_bf16
def test_cli_run_reports_each_part(sd_bundle, tmp_path, capsys):
    report = tmp_path / "r.json"
    assert main(["run", "--bundle", str(sd_bundle), "--backend", "openvino", "--precision", "bf16", "--prompt", "x",
                 "--steps", "2", "--out", str(tmp_path / "o.png"), "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "precision: small-unet bf16, large-pipeline bf16, text encoder bf16, VAE decoder bf16" in out
    assert set(json.loads(report.read_text())["precisions"].values()) == {"bf16"}
    # ort and torch have no bf16: one line, exit 2, nothing written
    for backend in ("ort", "torch"):
        assert main(["run", "--bundle", str(sd_bundle), "--backend", backend, "--precision", "bf16", "--prompt", "x",
                     "--out", str(tmp_path / f"{backend}.png")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --precision bf16 is for --backend openvino (CPU); {backend}") and \
            err.count("\n") == 1
        assert not (tmp_path / f"{backend}.png").exists()
    assert main(["run", "--bundle", str(sd_bundle), "--backend", "ort", "--precision", "fp32", "--prompt", "x",
                 "--steps", "2", "--out", str(tmp_path / "ort.png")]) == 0
    assert "precision: small-unet fp32, large-pipeline fp32, text encoder fp32, VAE decoder fp32" in \
        capsys.readouterr().out


@needs_bf16
def test_check_records_each_part_and_auto_follows(sd_bundle, tmp_path, capsys):
    """check --precision bf16 --record on an SD bundle: one verdict per U-Net, text encoder and VAE, with this CPU's
    ISA; auto then runs each part by its own verdict (random U-Nets miss the step bound, TE and VAE are within)."""
    from tstitch_trt.pipeline.sd import StitchedSDPipeline
    from tstitch_trt.serve.requests import KINDS

    bundle = tmp_path / "sd"
    shutil.copytree(sd_bundle, bundle)
    main(["check", "--bundle", str(bundle), "--precision", "bf16", "--record"])
    out = capsys.readouterr().out
    assert "bf16 text encoder: safe: on " in out and "bf16 VAE decoder: safe: on " in out
    raw = json.loads((bundle / "manifest.json").read_text())
    for entry in (raw["text_encoder"], raw["vae"], *raw["models"]):
        assert entry["bf16"]["isa"] == [bf16_isa()] and entry["bf16"]["checked_with"].startswith("openvino ")
    assert raw["text_encoder"]["bf16"]["safe"] and raw["vae"]["bf16"]["safe"]
    read_manifest(bundle)  # the schema takes what was recorded
    expected = {m["name"]: "bf16" if m["bf16"]["safe"] else "fp32" for m in raw["models"]}
    pipe = StitchedSDPipeline.from_bundle(bundle, backend="openvino", precision="auto")
    assert pipe.precisions == {**expected, "text encoder": "bf16", "VAE decoder": "bf16"}
    assert pipe.aux_precision_reason == f"bf16: the bundle records bf16 as safe on {bf16_isa()} for every part"
    pipe.close()
    served = KINDS["sd"].open(bundle, "openvino", "fp32")  # serve's --precision reaches every part
    assert set(served.precisions.values()) == {"fp32"}
    served.close()


@needs_bf16
def test_sdxl_both_text_encoders_follow_the_request(sdxl_bundle):
    from tstitch_trt.pipeline.sd import StitchedSDPipeline

    pipe = StitchedSDPipeline.from_bundle(sdxl_bundle, backend="openvino", precision="bf16")
    assert pipe.precisions["text encoder 2"] == "bf16" and set(pipe.precisions.values()) == {"bf16"}
    res = _run(pipe)
    assert np.isfinite(res.latents).all() and res.report["precisions"]["text encoder 2"] == "bf16"
    pipe.close()
