"""Conformance with the public T-Stitch DiT sampler (NVlabs/T-Stitch on facebookresearch/DiT).

The reference below is written from the reference's formulas, not from this package's code:
`create_diffusion(str(N))` respacing, `GaussianDiffusion.ddim_sample_loop` (eta 0,
clip_denoised=False) on the CFG-doubled batch, `TStitch.forward_with_cfg` choosing the model from
the ORIGINAL timestep (small if t/1000 >= 1 - ratio) and guiding the first 3 eps channels.
Only the DiT network is shared (it is checked against diffusers in test_dit.py).
Our side goes through the CLI: `tstitch-trt build` from .pt checkpoints, then `run`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tstitch_trt.cli import main
from tstitch_trt.models.dit import DiT, dit_config, randomized_dit


def ref_space_timesteps(num_timesteps: int, n: int) -> list[int]:
    stride = (num_timesteps - 1) / (n - 1) if n > 1 else 1
    return sorted({round(i * stride) for i in range(n)})


def ref_diffusion_tables(n: int) -> dict[str, np.ndarray]:
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    ac = np.cumprod(1.0 - betas)
    use = ref_space_timesteps(1000, n)
    last, new_betas = 1.0, []
    for i, a in enumerate(ac):
        if i in use:
            new_betas.append(1 - a / last)
            last = a
    b = np.array(new_betas)
    acr = np.cumprod(1.0 - b)
    return {"map": np.array(use), "ac": acr, "ac_prev": np.append(1.0, acr[:-1]),
            "sqrt_recip": np.sqrt(1.0 / acr), "sqrt_recipm1": np.sqrt(1.0 / acr - 1)}


def ref_forward_with_cfg(model: DiT, x, t, y, cfg_scale):
    half = x[: len(x) // 2]
    combined = torch.cat([half, half], 0)
    out = model(combined, t, y)
    eps, rest = out[:, :3], out[:, 3:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return torch.cat([torch.cat([half_eps, half_eps], 0), rest], dim=1)


def ref_tstitch_ddim(models: list[DiT], z: torch.Tensor, labels: list[int], n: int, ratio: float, cfg: float):
    tab = ref_diffusion_tables(n)

    def ext(arr, i, like):  # _extract_into_tensor: float64 table -> float32, broadcast
        return torch.full_like(like, float(np.float32(arr[i])))

    b = len(labels)
    x = torch.cat([z, z], 0)
    y = torch.tensor(labels + [1000] * b)
    for i in reversed(range(n)):
        t_orig = torch.full((2 * b,), int(tab["map"][i]), dtype=torch.int64)
        idx = 0 if t_orig[0].item() / 1000 >= (1 - ratio) else 1
        out = ref_forward_with_cfg(models[idx], x, t_orig, y, cfg)
        eps = out[:, : z.shape[1]]
        x0 = ext(tab["sqrt_recip"], i, x) * x - ext(tab["sqrt_recipm1"], i, x) * eps
        eps = (ext(tab["sqrt_recip"], i, x) * x - x0) / ext(tab["sqrt_recipm1"], i, x)
        a_prev = ext(tab["ac_prev"], i, x)
        x = x0 * torch.sqrt(a_prev) + torch.sqrt(1 - a_prev) * eps
    return x.chunk(2)[0]


@pytest.fixture(scope="module")
def pair_checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    paths = []
    for i, arch in enumerate(["DiT-S/2", "DiT-B/2"]):
        m = randomized_dit(dit_config(arch, input_size=16, num_classes=1000), seed=10 + i)
        p = d / f"{arch.replace('/', '-')}.pt"
        # official training checkpoints hold {"model", "ema", "opt", "args"}; the sampler uses "ema"
        torch.save({"ema": m.state_dict()} if i else m.state_dict(), p)
        paths.append(p)
    return paths


@torch.inference_mode()
def test_tstitch_ddim_conformance(pair_checkpoints, tmp_path) -> None:
    bundle = tmp_path / "bundle"
    s_ckpt, b_ckpt = pair_checkpoints
    assert main(["build", "--model", f"DiT-S/2={s_ckpt}", "--model", f"DiT-B/2={b_ckpt}", "--image-size", "128",
                 "--num-classes", "1000", "--backend", "torch", "--out", str(bundle)]) == 0
    labels = [207, 360]
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    np.save(tmp_path / "z.npy", z.numpy())
    assert main(["run", "--bundle", str(bundle), "--backend", "torch", "--sampler", "ddim", "--steps", "10",
                 "--ratio", "0.4", "--cfg-scale", "1.5", "--class-labels", "207,360", "--init-noise",
                 str(tmp_path / "z.npy"), "--save-latents", str(tmp_path / "out.npy"),
                 "--report", str(tmp_path / "r.json")]) == 0
    ours = np.load(tmp_path / "out.npy")

    models = []
    for arch, ckpt in [("DiT-S/2", s_ckpt), ("DiT-B/2", b_ckpt)]:
        m = DiT(dit_config(arch, input_size=16, num_classes=1000))
        sd = torch.load(ckpt, map_location="cpu", weights_only=True)
        m.load_state_dict(sd.get("ema", sd))
        models.append(m.eval())
    ref = ref_tstitch_ddim(models, z, labels, n=10, ratio=0.4, cfg=1.5).numpy()
    scale = np.abs(ref).max()
    assert scale > 1.0  # random weights: a non-trivial trajectory, not zeros
    print(f"conformance: max abs diff {np.abs(ours - ref).max():.3e}, reference max {scale:.3e}")
    assert np.abs(ours - ref).max() < 1e-4 * scale

    # the stitch actually happened: 4 of 10 steps (t >= 600) on the small model
    import json

    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["steps_per_model"] == [4, 6] and rep["step_model"][:4] == [0, 0, 0, 0]
    # and stitching changes the result: large-only differs
    ref_large = ref_tstitch_ddim(models, z, labels, n=10, ratio=0.0, cfg=1.5).numpy()
    assert np.abs(ref_large - ref).max() > 1e-3 * scale
