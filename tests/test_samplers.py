"""Sampler coefficient tables against a peer implementation no one here wrote: diffusers.

Both sides are driven by the same synthetic "model": eps (and the variance value v) are smooth
functions of the current sample and timestep, so any coefficient error compounds along the
trajectory instead of hiding in one step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from tstitch_trt.export.step_module import sampler_update  # noqa: E402
from tstitch_trt.sampling.coefficients import coefficient_table, ddim_table  # noqa: E402
from tstitch_trt.sampling.schedule import dit_schedule, linear_betas, respace, space_timesteps  # noqa: E402

SHAPE = (2, 4, 8, 8)


def fake_model(x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps, v): bounded, depends on x and t, v in (-1, 1)."""
    eps = torch.tanh(0.7 * x + t / 1000.0) + 0.1 * torch.sin(3 * x)
    v = torch.tanh(0.5 * x - 0.3 + t / 2000.0)
    return eps, v


def run_ours(sampler: str, schedule, x: torch.Tensor, noises: list[torch.Tensor] | None, eta: float = 0.0):
    table = torch.from_numpy(coefficient_table(sampler, schedule, eta))
    prev_x0 = torch.zeros_like(x)
    for i, t in enumerate(schedule.timesteps[::-1]):
        eps, v = fake_model(x, int(t))
        noise = noises[i] if noises is not None else torch.zeros_like(x)
        x, prev_x0 = sampler_update(x, eps, v, table[i], prev_x0, noise)
    return x


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_matches_diffusers(steps: int, eta: float) -> None:
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                    clip_sample=False, set_alpha_to_one=True, prediction_type="epsilon",
                                    timestep_spacing="leading")
    sched.set_timesteps(steps)
    ours_sched = respace(linear_betas(), space_timesteps(1000, f"ddim{steps}"))
    assert sched.timesteps.tolist() == ours_sched.timesteps[::-1].tolist()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(SHAPE, generator=gen, dtype=torch.float64).float()
    noises = [torch.randn(SHAPE, generator=gen) for _ in range(steps)]
    x = x0.clone()
    for i, t in enumerate(sched.timesteps):
        eps, _ = fake_model(x, int(t))
        x = sched.step(eps, t, x, eta=eta, variance_noise=noises[i]).prev_sample
    ours = run_ours("ddim", ours_sched, x0.clone(), noises, eta)
    assert rel_err(ours, x) < 2e-5


@pytest.mark.parametrize("steps", [10, 50])
def test_ddpm_learned_range_matches_diffusers(steps: int) -> None:
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                    clip_sample=False, variance_type="learned_range", prediction_type="epsilon")
    ours_sched = dit_schedule(steps)
    sched.set_timesteps(timesteps=ours_sched.timesteps[::-1].tolist())
    gen = torch.Generator().manual_seed(1)
    x_start = torch.randn(SHAPE, generator=gen)
    x = x_start.clone()
    noises = []
    for t in sched.timesteps:
        eps, v = fake_model(x, int(t))
        # diffusers draws its variance noise with randn_tensor(generator=...): draw the same noise ourselves
        g = torch.Generator().manual_seed(1000 + int(t))
        noises.append(torch.randn(SHAPE, generator=torch.Generator().manual_seed(1000 + int(t))))
        x = sched.step(torch.cat([eps, v], 1), t, x, generator=g).prev_sample
    ours = run_ours("ddpm", ours_sched, x_start.clone(), noises)
    assert rel_err(ours, x) < 2e-5


@pytest.mark.parametrize("steps", [10, 20])
def test_dpm_solver_pp_2m_matches_diffusers(steps: int) -> None:
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
        algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
        final_sigmas_type="zero", prediction_type="epsilon", thresholding=False)
    ours_sched = dit_schedule(steps)
    sched.set_timesteps(timesteps=ours_sched.timesteps[::-1].tolist())
    assert sched.timesteps.tolist() == ours_sched.timesteps[::-1].tolist()
    x_start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    x = x_start.clone()
    for t in sched.timesteps:
        eps, _ = fake_model(x, int(t))
        x = sched.step(eps, t, x).prev_sample
    ours = run_ours("dpm-solver++", ours_sched, x_start.clone(), None)
    assert rel_err(ours, x) < 5e-5


def test_dit_respacing_matches_reference_rule() -> None:
    # DiT's create_diffusion(str(N)): N positions 0, s, 2s, ... with s = 999/(N-1), Python-rounded
    assert space_timesteps(1000, 100)[:4] == [0, 10, 20, 30] and space_timesteps(1000, 100)[-1] == 999
    assert space_timesteps(1000, 250)[:5] == [0, 4, 8, 12, 16]
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, 1) == [0]
    s = dit_schedule(10)
    abar = np.cumprod(1 - linear_betas())
    np.testing.assert_allclose(s.alphas_cumprod, abar[s.timesteps])
    np.testing.assert_allclose(np.cumprod(1 - s.betas), s.alphas_cumprod, rtol=1e-12)


def test_ddim_eta_zero_has_no_noise_and_last_step_is_x0() -> None:
    table = ddim_table(dit_schedule(20), eta=0.0)
    assert (table[:, 7] == 0).all() and (table[:, 8] == 0).all()
    np.testing.assert_allclose(table[-1, 5], 1.0)  # last step: x_prev = sqrt(abar_prev = 1) * x0
    np.testing.assert_allclose(table[-1, 6], 0.0, atol=1e-7)
