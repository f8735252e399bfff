"""Golden files for the C++ runtime (cpp/tests/golden/, cpp/tests/data/toy_pair/), from the Python package.

The C++ tests read them and must reproduce them bit for bit (the RNG, schedules, coefficient tables,
stitch schedules, trajectory plans) or to float32 rounding (a toy trajectory through the stitched
loop, run here by TrtBackend on tests/fake_gpu.py's fakes). tests/test_cpp_goldens.py regenerates
them and fails if the committed ones drift. Refresh with:  python tests/cpp_goldens.py --write
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "cpp" / "tests" / "golden"
TOY_BUNDLE = REPO / "cpp" / "tests" / "data" / "toy_pair"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # fake_gpu

from tstitch_trt.sampling.coefficients import coefficient_table  # noqa: E402
from tstitch_trt.sampling.schedule import dit_schedule, linear_betas, space_timesteps  # noqa: E402
from tstitch_trt.sampling.stitch import stitch_schedule  # noqa: E402
from tstitch_trt.sampling.trajectory import plan_trajectory  # noqa: E402

SEEDS = [0, 1, 42, 123456789, 2**32, 2**63 + 5, 2**64 - 1]
SAMPLERS = [("ddim", 0.0), ("ddim", 0.5), ("ddpm", 0.0), ("dpm-solver++", 0.0)]
TOY_LATENT = (2, 4, 4)
TOY_SCALES = (0.5, 0.9)  # the "small" and "large" toy models
TOY_BUILDER = {"module": "tensorrt", "version": "10.13.0.35", "compute_capabilities": ["8.9"],
               "hardware_compatibility": "none", "version_compatible": False}


def f32_bits(a: np.ndarray) -> list[int]:
    return np.ascontiguousarray(a, dtype=np.float32).reshape(-1).view(np.uint32).tolist()


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def rng_golden() -> dict:
    out = []
    for seed in SEEDS:
        ss = np.random.SeedSequence(seed)
        gen = np.random.default_rng(seed)
        many = gen.standard_normal(1_000_000, dtype=np.float32)  # every ziggurat path, tail included
        out.append({
            "seed": seed,
            "pool": [int(v) for v in ss.pool],
            "state_u64": [int(v) for v in ss.generate_state(4, np.uint64)],
            "raw_u64": [int(v) for v in np.random.PCG64(seed).random_raw(8)],
            "normal_first_bits": f32_bits(many[:32]),
            "normal_1m_sha256": sha(many),
        })
    # x_init then per-step noise from one generator, as the pipeline draws them
    gen = np.random.default_rng(7)
    x = gen.standard_normal((2, 1, 3, 3), dtype=np.float32)  # 18 draws: an even count
    noise = gen.standard_normal((3, 1, 1, 3, 3), dtype=np.float32)  # 27 draws: leaves a buffered half word
    after = gen.standard_normal(5, dtype=np.float32)
    return {"seeds": out, "sequence": {"seed": 7, "counts": [18, 27, 5],
                                       "bits": f32_bits(np.concatenate([x.ravel(), noise.ravel(), after]))}}


def sampling_golden() -> dict:
    spacing = [{"T": t, "steps": n, "timesteps": space_timesteps(t, n)}
               for t, n in [(1000, 1), (1000, 2), (1000, 7), (1000, 50), (1000, 100), (1000, 250), (1000, 999),
                            (1000, 1000), (100, 33), (10, 4)]]
    ddim_spacing = [{"T": t, "steps": n, "timesteps": space_timesteps(t, f"ddim{n}")}
                    for t, n in [(1000, 10), (1000, 50)]]
    schedules = []
    for steps in (1, 2, 8, 50, 250):
        s = dit_schedule(steps)
        schedules.append({"steps": steps, "timesteps": s.timesteps.tolist(),
                          "alphas_cumprod": s.alphas_cumprod.tolist(), "betas": s.betas.tolist()})
    tables = []
    for sampler, eta in SAMPLERS:
        for steps in (1, 2, 3, 8, 50, 250):
            t = coefficient_table(sampler, dit_schedule(steps), eta)
            entry = {"sampler": sampler, "eta": eta, "steps": steps, "shape": list(t.shape), "sha256": sha(t)}
            if steps <= 50:
                entry["bits"] = f32_bits(t)
            tables.append(entry)
    stitch = []
    for steps in (8, 50, 250):
        ts = dit_schedule(steps).timesteps[::-1]
        for r in (0.0, 0.1, 0.4, 0.5, 0.7, 1.0):
            stitch.append({"steps": steps, "ratio": r, "models": stitch_schedule(ts, 2, ratio=r).tolist()})
        for fr in ((0.3, 0.3, 0.4), (0.2, 0.5, 0.3), (1 / 3, 1 / 3, 1 / 3), (0.0, 0.5, 0.5)):
            models = stitch_schedule(ts, 3, fractions=fr).tolist()
            stitch.append({"steps": steps, "fractions": list(fr), "models": models})
    plans = []
    for sampler, eta in SAMPLERS:
        rng = np.random.default_rng(3)
        shape = (2, *TOY_LATENT)
        x = rng.standard_normal(shape, dtype=np.float32)
        p = plan_trajectory(sampler, 8, 2, shape, rng, ratio=0.4, eta=eta)
        plans.append({"sampler": sampler, "eta": eta, "seed": 3, "steps": 8, "ratio": 0.4, "x_init_bits": f32_bits(x),
                      "timesteps": p.timesteps.tolist(), "step_model": p.step_model.tolist(),
                      "coef_bits": f32_bits(p.coef),
                      "noise_bits": f32_bits(p.noise) if p.noise is not None else []})
    return {"linear_betas_1000": linear_betas(1000).tolist(), "linear_betas_100": linear_betas(100).tolist(),
            "spacing": spacing, "ddim_spacing": ddim_spacing, "schedules": schedules, "tables": tables,
            "stitch": stitch, "plans": plans}


def write_toy_bundle(dst: Path) -> None:
    """A two-model bundle whose "trt" engines are toy plans (fake_gpu.toy_plan) for the C++ fake engine."""
    from fake_gpu import toy_plan
    from tstitch_trt.bundle.manifest import EngineEntry, Manifest, ModelEntry, sha256_file

    if dst.exists():
        shutil.rmtree(dst)
    (dst / "trt").mkdir(parents=True)
    models = []
    for i, scale in enumerate(TOY_SCALES):
        rel = f"trt/{i}-toy.plan"
        (dst / rel).write_bytes(toy_plan(TOY_LATENT, 11, scale) + (b"#" * 64 * (i + 1)))  # model sizes differ
        # a complete (tiny) DiT config: the schema requires every field the runtime may read
        arch = {"depth": 1, "hidden_size": 8, "num_heads": 1, "patch_size": 2, "input_size": TOY_LATENT[1],
                "in_channels": TOY_LATENT[0], "num_classes": 10, "learn_sigma": False, "mlp_ratio": 4.0}
        models.append(ModelEntry(name=f"Toy-{'SL'[i]}", family="dit", arch=arch, engines={
            "trt": EngineEntry(file=rel, sha256=sha256_file(dst / rel), batch_range=(1, 16),
                               builder=dict(TOY_BUILDER))}))
    c, h, w = TOY_LATENT
    lat = ["B", c, h, w]
    io = {"inputs": {"x": {"shape": lat, "dtype": "float32"}, "t": {"shape": ["B"], "dtype": "int64"},
                     "y": {"shape": ["B"], "dtype": "int64"}, "guidance": {"shape": [], "dtype": "float32"},
                     "coef": {"shape": [11], "dtype": "float32"}, "prev_x0": {"shape": lat, "dtype": "float32"},
                     "noise": {"shape": lat, "dtype": "float32"}},
          "outputs": {"x_next": {"shape": lat, "dtype": "float32"}, "x0": {"shape": lat, "dtype": "float32"}}}
    m = Manifest(pipeline="dit-class-conditional", models=models, num_classes=10, image_size=h, latent_scale_factor=1.0,
                 guidance_channels=c, io=io, created_by="tests/cpp_goldens.py")
    (dst / "manifest.json").write_text(m.to_json() + "\n")


def loop_golden(bundle: Path) -> dict:
    """Toy trajectories through the Python TrtBackend (fake CUDA + fake TensorRT) on the toy bundle."""
    from fake_gpu import FakeCuda, make_fake_trt, toy_step_for
    from tstitch_trt.bundle.manifest import read_manifest
    from tstitch_trt.runtime.loop import run_stitched
    from tstitch_trt.runtime.trt_backend import TrtBackend

    manifest = read_manifest(bundle)
    runs = []
    cases = [("ddim", 0.0, 2, 8, 0.4, None), ("ddim", 0.5, 2, 8, 0.4, None), ("ddpm", 0.0, 2, 8, 0.4, None),
             ("dpm-solver++", 0.0, 2, 8, 0.4, None), ("ddpm", 0.0, 3, 10, 0.0, None), ("ddim", 0.0, 1, 10, 1.0, None)]
    for sampler, eta, batch, steps, ratio, fractions in cases:
        for seed in (0, 11):
            cu = FakeCuda()
            trt = make_fake_trt(cu, toy_step_for(), name="tensorrt", version="10.13.0.35")
            backend = TrtBackend(bundle, manifest, kind="trt", trt_module=trt, cuda=cu, cuda_graph=False)
            rng = np.random.default_rng(seed)
            shape = (batch, *manifest.latent_shape)
            x = rng.standard_normal(shape, dtype=np.float32)
            plan = plan_trajectory(sampler, steps, 2, shape, rng, ratio=ratio, fractions=fractions, eta=eta)
            labels = np.arange(batch, dtype=np.int64) % manifest.num_classes
            res = run_stitched(backend, plan, x, labels, 1.5, progress=False)
            backend.close()
            runs.append({"sampler": sampler, "eta": eta, "batch": batch, "steps": steps, "ratio": ratio, "seed": seed,
                         "cfg": 1.5, "labels": labels.tolist(), "step_model": plan.step_model.tolist(),
                         "x": [float(v) for v in res.x.ravel()]})
    return {"runs": runs}


def generate(golden: Path, toy_bundle: Path) -> None:
    golden.mkdir(parents=True, exist_ok=True)
    write_toy_bundle(toy_bundle)
    for name, data in (("rng", rng_golden()), ("sampling", sampling_golden()), ("loop", loop_golden(toy_bundle))):
        (golden / f"{name}.json").write_text(json.dumps(data, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="write the goldens into cpp/tests")
    args = ap.parse_args()
    if not args.write:
        ap.error("pass --write to regenerate cpp/tests/golden and cpp/tests/data/toy_pair")
    generate(GOLDEN, TOY_BUNDLE)
    print(f"wrote {GOLDEN} and {TOY_BUNDLE}")
