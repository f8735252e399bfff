"""StepModule semantics (CFG, guidance channels, learned variance) and ratio 0/1 bit-exactness."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tstitch_trt.bundle.manifest import read_manifest
from tstitch_trt.export.step_module import StepModule
from tstitch_trt.export.torch_backend import load_step_modules
from tstitch_trt.models.dit import dit_config, randomized_dit
from tstitch_trt.pipeline.dit import StitchedPipeline
from tstitch_trt.sampling.coefficients import NUM_COEFS


def _net():
    return randomized_dit(dit_config("DiT-S/4", input_size=8, num_classes=10, depth=2, hidden_size=64, num_heads=2), 3)


@torch.inference_mode()
def test_cfg_semantics_first_three_channels_and_null_label() -> None:
    net = _net()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([500, 500]), torch.tensor([1, 7])
    s = torch.tensor(4.0)
    cond, uncond = net(x, t, y), net(x, t, torch.tensor([10, 10]))
    eps, v = StepModule(net, guidance_channels=3).guided_output(x, t, y, s)
    torch.testing.assert_close(eps[:, :3], uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps[:, 3:], cond[:, 3:4])  # 4th eps channel unguided (reference)
    torch.testing.assert_close(v, cond[:, 4:])  # variance half from the conditional pass
    eps_all, _ = StepModule(net, guidance_channels=None).guided_output(x, t, y, s)
    expected_all = uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4])
    torch.testing.assert_close(eps_all, expected_all, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_step_is_x0_prediction_and_update() -> None:
    net = _net()
    step = StepModule(net)
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([300]), torch.tensor([2])
    coef = torch.zeros(NUM_COEFS)
    coef[0], coef[1], coef[2], coef[5] = 2.0, 0.5, 1.0, 1.0  # x0 = 2x - 0.5 eps; x_next = x0
    eps, _ = step.guided_output(x, t, y, torch.tensor(1.5))
    x_next, x0 = step(x, t, y, torch.tensor(1.5), coef, torch.zeros_like(x), torch.zeros_like(x))
    torch.testing.assert_close(x0, 2 * x - 0.5 * eps)
    torch.testing.assert_close(x_next, x0)


def _alone(bundle: Path, model: int, res_report: dict, x_init: np.ndarray, labels: list[int]) -> np.ndarray:
    """The same trajectory run by one model's StepModule in a plain loop, without the runtime."""
    from tstitch_trt.sampling.trajectory import plan_trajectory

    manifest = read_manifest(bundle)
    mod = load_step_modules(bundle, manifest)[model]
    plan = plan_trajectory("ddim", res_report["steps"], 2, x_init.shape, np.random.default_rng(0), ratio=0.0)
    x, prev = torch.from_numpy(x_init), torch.zeros_like(torch.from_numpy(x_init))
    with torch.inference_mode():
        for i, t in enumerate(plan.timesteps):
            x, prev = mod(x, torch.full((len(labels),), int(t)), torch.tensor(labels), torch.tensor(1.5),
                          torch.from_numpy(plan.coef[i]), prev, torch.zeros_like(x))
    return x.numpy()


def test_ratio_0_is_large_alone_and_ratio_1_small_alone_bit_for_bit(tiny_pair: Path) -> None:
    pipe = StitchedPipeline.from_bundle(tiny_pair, backend="torch")
    x_init = np.random.default_rng(5).standard_normal((2, 4, 8, 8), dtype=np.float32)
    for ratio, model in [(0.0, 1), (1.0, 0)]:
        res = pipe(class_labels=[3, 4], ratio=ratio, steps=8, cfg_scale=1.5, init_noise=x_init, decode=False)
        assert res.report["steps_per_model"][model] == 8
        assert np.array_equal(res.latents, _alone(tiny_pair, model, res.report, x_init, [3, 4]))
    pipe.close()
