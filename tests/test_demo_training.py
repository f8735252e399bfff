"""The demo pair's training objective and its quality evaluator's math (no shipped pair needed)."""

from __future__ import annotations

import subprocess
import sys

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


def test_demo_and_eval_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import tstitch_trt.demo, tstitch_trt.eval, tstitch_trt.eval.quality, tstitch_trt.eval.scorer\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
