"""SD sampler tables against diffusers' schedulers of the same name, along whole trajectories.

Every scheduler is built with from_config(the SD 1.5 scheduler config) as a user of the large
model would get it; both sides are driven by the same synthetic eps (a smooth function of the
network input and the timestep), so a wrong coefficient compounds instead of hiding in one step.
Our side runs the exact torch update the U-Net step graph exports (export.unet_step).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from tstitch_trt.errors import UserError  # noqa: E402
from tstitch_trt.export.unet_step import sd_sampler_update  # noqa: E402
from tstitch_trt.models.sd_random import SD15_SCHEDULER  # noqa: E402
from tstitch_trt.sampling.sd_samplers import HISTORY, C, default_sampler, sd_table  # noqa: E402
from tstitch_trt.sampling.stitch import stitch_schedule_by_call  # noqa: E402

CLASSES = {"pndm": "PNDMScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
           "dpm-solver++": "DPMSolverMultistepScheduler"}
SHAPE = (2, 4, 8, 8)


def fake_eps(x: torch.Tensor, t: float) -> torch.Tensor:
    return torch.tanh(0.7 * x + t / 1000.0) + 0.1 * torch.sin(3 * x)


def run_diffusers(sampler: str, steps: int, x_unit: torch.Tensor, eta: float = 0.0,
                  noises: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[float]]:
    sched = getattr(diffusers, CLASSES[sampler]).from_config(SD15_SCHEDULER)
    sched.set_timesteps(steps)
    x = x_unit * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        eps = fake_eps(sched.scale_model_input(x, t), float(t))
        kwargs = {"eta": eta, "variance_noise": noises[i]} if sampler == "ddim" and noises is not None else {}
        x = sched.step(eps, t, x, **kwargs).prev_sample
    return x, [float(t) for t in sched.timesteps]


def run_ours(table, x_unit: torch.Tensor, noises: list[torch.Tensor] | None = None,
             coef: np.ndarray | None = None) -> torch.Tensor:
    coef = torch.from_numpy(table.coef if coef is None else coef)
    x = x_unit * table.init_noise_sigma
    prev_x0, saved = torch.zeros_like(x), torch.zeros_like(x)
    hist = torch.zeros((x.shape[0], HISTORY, *x.shape[1:]))
    for i, t in enumerate(table.timesteps):
        eps = fake_eps(coef[i, C["c_in"]] * x, float(t))
        noise = noises[i] if noises is not None else torch.zeros_like(x)
        x, prev_x0, hist, saved = sd_sampler_update(x, eps, coef[i], prev_x0, hist, saved, noise)
    return x


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def start() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("sampler", ["pndm", "ddim", "euler", "dpm-solver++"])
@pytest.mark.parametrize("steps", [4, 10, 25, 50])
def test_sampler_matches_diffusers(sampler: str, steps: int) -> None:
    x_unit = start()
    ref, ref_ts = run_diffusers(sampler, steps, x_unit)
    table = sd_table(sampler, SD15_SCHEDULER, steps)
    np.testing.assert_allclose(table.timesteps, ref_ts, rtol=0, atol=1e-3)
    assert rel_err(run_ours(table, x_unit), ref) < 2e-5


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_ddim_eta_matches_diffusers(eta: float) -> None:
    gen = torch.Generator().manual_seed(1)
    x_unit = torch.randn(SHAPE, generator=gen)
    noises = [torch.randn(SHAPE, generator=gen) for _ in range(20)]
    ref, _ = run_diffusers("ddim", 20, x_unit, eta=eta, noises=noises)
    table = sd_table("ddim", SD15_SCHEDULER, 20, eta=eta)
    assert table.coef[:, C["sigma"]].max() > 0
    assert rel_err(run_ours(table, x_unit, noises), ref) < 2e-5


def test_pndm_calls_and_repeated_timestep() -> None:
    table = sd_table("pndm", SD15_SCHEDULER, 50)
    assert len(table.timesteps) == 51
    assert table.timesteps[:4].tolist() == [981, 961, 961, 941]
    assert table.coef[1, C["k_s"]] == 1 and table.coef[1, C["shift"]] == 0  # 2nd call: saved sample, no shift
    assert table.coef[0, C["save"]] == 1


def test_euler_scales_input_and_start() -> None:
    table = sd_table("euler", SD15_SCHEDULER, 10)
    sched = diffusers.EulerDiscreteScheduler.from_config(SD15_SCHEDULER)
    sched.set_timesteps(10)
    assert table.init_noise_sigma == pytest.approx(float(sched.init_noise_sigma), rel=1e-6)
    assert table.coef[0, C["c_in"]] < 0.1  # 1 / sqrt(sigma_max^2 + 1), sigma_max ~ 14.6


@pytest.mark.parametrize("sampler,row,name", [("pndm", 10, "a1"), ("pndm", 1, "a0"), ("dpm-solver++", 5, "d1"),
                                              ("euler", 3, "c_in"), ("ddim", 2, "w_e")])
def test_a_wrong_coefficient_fails(sampler: str, row: int, name: str) -> None:
    """The comparison above can fail: one coefficient of one row off by 1% breaks it."""
    x_unit = start()
    ref, _ = run_diffusers(sampler, 20, x_unit)
    table = sd_table(sampler, SD15_SCHEDULER, 20)
    coef = table.coef.copy()
    coef[row, C[name]] *= 1.01
    assert rel_err(run_ours(table, x_unit, coef=coef), ref) > 1e-4


def test_default_sampler_from_config() -> None:
    assert default_sampler(SD15_SCHEDULER) == "pndm"
    assert default_sampler({**SD15_SCHEDULER, "_class_name": "EulerDiscreteScheduler"}) == "euler"
    with pytest.raises(UserError, match="LMSDiscreteScheduler"):
        default_sampler({**SD15_SCHEDULER, "_class_name": "LMSDiscreteScheduler"})


def test_sd_stitch_rule_counts_calls() -> None:
    """(i + 1) / n_calls <= r: PNDM 50 steps = 51 calls, r = 0.4 -> 20 small calls (REFERENCE.md)."""
    sched = stitch_schedule_by_call(51, 2, ratio=0.4)
    assert sched.tolist() == [0] * 20 + [1] * 31
    assert stitch_schedule_by_call(51, 2, ratio=0.0).tolist() == [1] * 51
    assert stitch_schedule_by_call(51, 2, ratio=1.0).tolist() == [0] * 51
    three = stitch_schedule_by_call(10, 3, fractions=[0.3, 0.3, 0.4])
    assert three.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert stitch_schedule_by_call(10, 2, fractions=[0.4, 0.6]).tolist() == \
        stitch_schedule_by_call(10, 2, ratio=0.4).tolist()


# LCM: diffusers' LCMScheduler built from the large model's (non-LCM) config, as the bundle's betas come
# from it, and from an LCM config (lcm-sdxl / LCM_Dreamshaper ship one with original_inference_steps 50).
LCM_CONFIGS = {
    "sd15": SD15_SCHEDULER,
    "lcm": {"_class_name": "LCMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "num_train_timesteps": 1000, "original_inference_steps": 50,
            "set_alpha_to_one": True, "steps_offset": 1, "timestep_scaling": 10.0, "prediction_type": "epsilon"},
    "lcm-orig-100": {"_class_name": "LCMScheduler", "original_inference_steps": 100, "timestep_scaling": 5.0},
}


def run_lcm_diffusers(config: dict, steps: int, x_unit: torch.Tensor, seed: int) -> tuple[torch.Tensor, list[float],
                                                                                            list[torch.Tensor]]:
    """LCMScheduler along a whole trajectory; the noise it injects comes from a generator, and the same
    draws (in order) are returned for our side."""
    sched = diffusers.LCMScheduler.from_config(config)
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    noises = []
    x = x_unit * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = fake_eps(x, float(t))
        state = gen.get_state()
        x = sched.step(eps, t, x, generator=gen).prev_sample
        if sched.step_index < steps:  # a noise draw happened: replay it from the saved state
            replay = torch.Generator()
            replay.set_state(state)
            noises.append(torch.randn(x.shape, generator=replay))
        else:
            noises.append(torch.zeros_like(x))
    return x, [float(t) for t in sched.timesteps], noises


@pytest.mark.parametrize("config", sorted(LCM_CONFIGS))
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_matches_diffusers(config: str, steps: int) -> None:
    x_unit = start()
    ref, ref_ts, noises = run_lcm_diffusers(LCM_CONFIGS[config], steps, x_unit, seed=5)
    table = sd_table("lcm", LCM_CONFIGS[config], steps)
    np.testing.assert_allclose(table.timesteps, ref_ts, rtol=0, atol=0)
    assert table.coef[-1, C["sigma"]] == 0 and (steps == 1 or table.coef[0, C["sigma"]] > 0.5)
    assert rel_err(run_ours(table, x_unit, noises), ref) < 2e-5


@pytest.mark.parametrize("row,name", [(0, "w_d"), (1, "w_d"), (2, "sigma"), (3, "m"), (3, "r")])
def test_lcm_a_wrong_coefficient_fails(row: int, name: str) -> None:
    """(c_skip, hence w_x, is ~1e-8 at LCM's timesteps with timestep_scaling 10: a 1% error there is invisible.)"""
    x_unit = start()
    ref, _, noises = run_lcm_diffusers(SD15_SCHEDULER, 4, x_unit, seed=5)
    coef = sd_table("lcm", SD15_SCHEDULER, 4).coef.copy()
    coef[row, C[name]] *= 1.01
    assert rel_err(run_ours(sd_table("lcm", SD15_SCHEDULER, 4), x_unit, noises, coef=coef), ref) > 1e-4


def test_lcm_noise_rows_and_defaults() -> None:
    from tstitch_trt.sampling.sd_samplers import draw_step_noise, sd_needs_noise

    assert sd_needs_noise("lcm", 0.0) and not sd_needs_noise("euler", 0.0)
    noise = draw_step_noise("lcm", 4, (1, 4, 2, 2), np.random.default_rng(0))
    assert (noise[-1] == 0).all() and (noise[:-1] != 0).all()
    assert default_sampler(LCM_CONFIGS["lcm"]) == "lcm"
    with pytest.raises(UserError, match="original_inference_steps 50"):
        sd_table("lcm", SD15_SCHEDULER, 51)
