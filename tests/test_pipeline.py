"""Pipeline-level behaviour: backend choice with fallback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tstitch_trt.errors import BackendUnavailable, BundleError, UserError
from tstitch_trt.pipeline import backends, dit


def test_auto_falls_through_a_refused_engine(tiny_pair: Path, monkeypatch) -> None:
    monkeypatch.setattr(backends, "backend_candidates",
                        lambda m, r, p="auto": [("trt-rtx", "engines and a GPU"), ("ort", "cpu")])
    real_open = backends.open_backend

    def fake_open(kind, bundle_dir, manifest, device=None, **kw):
        if kind == "trt-rtx":
            raise BackendUnavailable("engine built for compute capability 8.9, this GPU is 9.0; rebuild")
        return real_open(kind, bundle_dir, manifest, device=device, **kw)

    monkeypatch.setattr(backends, "open_backend", fake_open)
    pipe = dit.StitchedPipeline.from_bundle(tiny_pair, backend="auto")
    assert pipe.backend.name == "ort"
    assert "trt-rtx cannot run here (engine built for compute capability 8.9" in pipe.backend_reason
    res = pipe(class_labels=[1], steps=2, decode=False)
    assert "trt-rtx cannot run here" in res.report["backend_reason"]
    pipe.close()


def test_auto_never_falls_through_a_damaged_bundle(tiny_pair: Path, monkeypatch) -> None:
    """Integrity is not availability: a bad engine file must stop the run, not hand it to the next backend."""
    monkeypatch.setattr(backends, "backend_candidates",
                        lambda m, r, p="auto": [("trt-rtx", "engines and a GPU"), ("ort", "cpu")])

    def fake_open(kind, bundle_dir, manifest, device=None, **kw):
        raise BundleError("the trt-rtx engine of DiT-S/2 has x as float16; rebuild the bundle")

    monkeypatch.setattr(backends, "open_backend", fake_open)
    with pytest.raises(BundleError, match="has x as float16"):
        dit.StitchedPipeline.from_bundle(tiny_pair, backend="auto")


def test_requested_backend_refusal_is_an_error(tiny_pair: Path, monkeypatch) -> None:
    def refuse(kind, bundle_dir, manifest, device=None, **kw):
        raise UserError("no")

    monkeypatch.setattr(backends, "open_backend", refuse)
    with pytest.raises(UserError, match="no"):
        dit.StitchedPipeline.from_bundle(tiny_pair, backend="ort")


def test_auto_without_gpu_picks_ort_and_says_why(tiny_pair: Path, monkeypatch) -> None:
    real = backends._has_module
    monkeypatch.setattr(backends, "_has_module", lambda name: name != "openvino" and real(name))
    pipe = dit.StitchedPipeline.from_bundle(tiny_pair, backend="auto")
    assert pipe.backend.name == "ort"
    assert "using ONNX Runtime" in pipe.backend_reason
    pipe.close()
