"""Golden files for the C++ runtime (cpp/tests/golden/, cpp/tests/data/toy_pair/), from the Python package.

The C++ tests read them and must reproduce them bit for bit (the RNG, schedules, coefficient tables,
stitch schedules, trajectory plans) or to float32 rounding (a toy trajectory through the stitched
loop, run here by TrtBackend on tests/fake_gpu.py's fakes). manifest_cases.json is the conformance
corpus of the two manifest readers: hostile edits (RFC 6902 patches) of a valid DiT and SD manifest,
each with the exact refusal Python gives; the C++ reader must give the same. tests/test_cpp_goldens.py regenerates
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
TOY_SD_BUNDLE = REPO / "cpp" / "tests" / "data" / "toy_sd"
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
    # FORA's full / cached call plan (sampling/cache_plan.py, as pipeline/dit.py calls it on the plan's integer
    # timesteps and stitch): 2 models by ratio, 3 by fractions, each interval; and the request bound both check
    from tstitch_trt.sampling.cache_plan import MAX_CACHE_INTERVAL, cached_calls

    cache_plans = []
    for steps in (8, 10, 50):
        ts = dit_schedule(steps).timesteps[::-1]
        stitches = [{"ratio": r, "models": stitch_schedule(ts, 2, ratio=r)} for r in (0.0, 0.4, 0.5, 1.0)]
        stitches.append({"fractions": [0.3, 0.3, 0.4], "models": stitch_schedule(ts, 3, fractions=(0.3, 0.3, 0.4))})
        for st in stitches:
            for interval in (1, 2, 3, 5, 1000):
                cache_plans.append({"steps": steps, **{k: v for k, v in st.items() if k != "models"},
                                    "interval": interval, "models": st["models"].tolist(),
                                    "cached": [int(c) for c in cached_calls(ts, st["models"], interval)]})
    return {"linear_betas_1000": linear_betas(1000).tolist(), "linear_betas_100": linear_betas(100).tolist(),
            "spacing": spacing, "ddim_spacing": ddim_spacing, "schedules": schedules, "tables": tables,
            "stitch": stitch, "plans": plans, "cache_plans": cache_plans, "max_cache_interval": MAX_CACHE_INTERVAL}


SD_CONFIGS = {  # diffusers scheduler_config.json dicts (SD 1.5's PNDM as shipped; Euler / DPM / DDIM variants)
    "sd15-pndm": None,  # SD15_PNDM, below
    "euler-linspace": {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                       "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
                       "timestep_spacing": "linspace", "prediction_type": "epsilon"},
    "euler-leading": {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                      "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
                      "timestep_spacing": "leading"},
    "dpm-linspace": {"_class_name": "DPMSolverMultistepScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                     "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "algorithm_type": "dpmsolver++",
                     "solver_order": 2, "lower_order_final": True},
    "dpm-trailing": {"_class_name": "DPMSolverMultistepScheduler", "beta_start": 0.0001, "beta_end": 0.02,
                     "beta_schedule": "linear", "num_train_timesteps": 1000, "timestep_spacing": "trailing"},
    "ddim-trailing": {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                      "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                      "steps_offset": 1, "clip_sample": False, "timestep_spacing": "trailing"},
}
SD_STEPS = (1, 2, 7, 20, 25, 50)


def sd_sampling_golden() -> dict:
    """SD sampler tables (bit patterns) for every sampler on several configs and step counts, and the call rule."""
    from tstitch_trt.sampling.cache_plan import cached_calls
    from tstitch_trt.sampling.sd_samplers import SD_SAMPLERS, sd_table
    from tstitch_trt.sampling.stitch import stitch_schedule_by_call

    configs = {name: cfg or dict(SD15_PNDM) for name, cfg in SD_CONFIGS.items()}
    tables = []
    for name, cfg in configs.items():
        for sampler in SD_SAMPLERS:
            for steps in SD_STEPS:
                for eta in ((0.0, 0.5) if sampler == "ddim" else (0.0,)):
                    t = sd_table(sampler, cfg, steps, eta)
                    tables.append({"config": name, "sampler": sampler, "steps": steps, "eta": eta,
                                   "timesteps_bits": f32_bits(t.timesteps), "coef_bits": f32_bits(t.coef),
                                   "init_noise_sigma_bits": f32_bits(np.float32(t.init_noise_sigma))[0]})
    by_call = []
    for n_calls in (1, 8, 21, 51):
        for r in (0.0, 0.3, 0.4, 0.5, 1.0):
            models = stitch_schedule_by_call(n_calls, 2, ratio=r).tolist()
            by_call.append({"calls": n_calls, "ratio": r, "models": models})
        for fr in ((0.3, 0.3, 0.4), (1 / 3, 1 / 3, 1 / 3), (0.0, 0.5, 0.5)):
            by_call.append({"calls": n_calls, "fractions": list(fr),
                            "models": stitch_schedule_by_call(n_calls, 3, fractions=fr).tolist()})
    # DeepCache's full / cached call plan (sampling/cache_plan.py) on the calls and stitch of these tables
    cache_plans = []
    for sampler in ("pndm", "ddim", "euler", "dpm-solver++"):
        for steps, ratio in ((8, 0.0), (8, 0.4), (20, 0.5), (3, 0.4)):
            t = sd_table(sampler, configs["sd15-pndm"], steps).timesteps
            models = stitch_schedule_by_call(len(t), 2, ratio=ratio)
            for interval in (1, 2, 3, 5):
                cache_plans.append({"sampler": sampler, "steps": steps, "ratio": ratio, "interval": interval,
                                    "cached": [int(c) for c in cached_calls(t, models, interval)]})
    return {"configs": configs, "tables": tables, "by_call": by_call, "cache_plans": cache_plans}


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


SD_TOY_LATENT = (2, 4, 4)
SD_TOY_TEXT = (3, 8)  # tokens, cross-attention width
TOY_VAE_FACTOR = 8  # image pixels per latent pixel (image_size = 8 * sample_size)


def toy_vae(z: np.ndarray) -> np.ndarray:
    """The C++ fake VAE decoder ("TOYVAE f,"): (B, C, h, w) -> (B, 3, h*f, w*f), channel k from latent channel
    k % C, nearest upsampling, image = z * 0.25 + (0.5 k - 0.5) in float32 (partly outside [-1, 1]: clipped)."""
    c = z.shape[1]
    up = z.repeat(TOY_VAE_FACTOR, axis=2).repeat(TOY_VAE_FACTOR, axis=3)
    return np.stack([up[:, k % c] * np.float32(0.25) + np.float32(0.5 * k - 0.5) for k in range(3)], axis=1)
SD15_PNDM = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
             "clip_sample": False}


def write_toy_sd_bundle(dst: Path) -> None:
    """An SD-shaped two-U-Net bundle (the role-bound step graph of export/unet_step.py) whose "trt" files are
    toy plans ("TOYSD c,h,w,k,scale,") for the C++ fake engine, a toy text encoder and VAE ("TOYVAE f,": toy_vae)."""
    from tstitch_trt.bundle.manifest import EngineEntry, Manifest, ModelEntry, sha256_file
    from tstitch_trt.export.unet_step import UNET_STEP_ROLES
    from tstitch_trt.sampling.sd_samplers import HISTORY, SD_NUM_COEFS

    if dst.exists():
        shutil.rmtree(dst)
    for d in ("trt", "text_encoder", "tokenizer", "vae"):
        (dst / d).mkdir(parents=True)
    c, s = SD_TOY_LATENT[0], SD_TOY_LATENT[1]
    n_tok, width = SD_TOY_TEXT

    def entry(rel: str, data: bytes) -> EngineEntry:
        (dst / rel).write_bytes(data)
        return EngineEntry(file=rel, sha256=sha256_file(dst / rel), batch_range=(1, 4), builder=dict(TOY_BUILDER))

    models = []
    for i, scale in enumerate(TOY_SCALES):
        plan = b"TOYSD" + f"{c},{s},{s},{SD_NUM_COEFS},{scale},".encode() + b"#" * 64 * (i + 1)
        arch = {"in_channels": c, "out_channels": c, "sample_size": s, "cross_attention_dim": width}
        models.append(ModelEntry(name=f"ToyUNet-{'SL'[i]}", family="unet", arch=arch,
                                 engines={"trt": entry(f"trt/{i}-toy-unet.plan", plan)}))
    lat = ["B", c, "H", "W"]
    hist = ["B", HISTORY, c, "H", "W"]
    f32 = "float32"
    inputs = {"x": lat, "t": ["B"], "context": ["2B", n_tok, width], "guidance": [], "coef": [SD_NUM_COEFS],
              "prev_x0": lat, "eps_hist": hist, "saved": lat, "noise": lat}
    outputs = {"x_next": lat, "x0": lat, "eps_hist_next": hist, "saved_next": lat}
    io = {"inputs": {n: {"shape": v, "dtype": f32} for n, v in inputs.items()},
          "outputs": {n: {"shape": v, "dtype": f32} for n, v in outputs.items()},
          "roles": UNET_STEP_ROLES, "dim_ranges": {"H": [2, s, 2 * s], "W": [2, s, 2 * s]}}
    text = {"source": "toy", "kind": "CLIPTextModel", "hidden_state": "last",
            "engines": {"trt": entry("text_encoder/toy.plan", b"TOYTEXT" + f"{n_tok},{width},".encode())},
            "io": {"inputs": {"input_ids": {"shape": ["N", n_tok], "dtype": "int64"}},
                   "outputs": {"text_embeddings": {"shape": ["N", n_tok, width], "dtype": f32}},
                   "dim_ranges": {"N": [2, 2, 8]}}}
    tok = dst / "tokenizer" / "tokenizer.json"
    tok.write_text("{}\n")
    tokenizer = {"file": {"file": "tokenizer/tokenizer.json", "sha256": sha256_file(tok)},
                 "max_length": n_tok, "pad_id": 0, "kind": "clip"}
    vae_plan = b"TOYVAE" + f"{TOY_VAE_FACTOR},".encode()
    vae = {"source": "toy", "kind": "AutoencoderKL", "engines": {"trt": entry("vae/toy.plan", vae_plan)}}
    m = Manifest(pipeline="sd", models=models, num_classes=0, image_size=8 * s, latent_scale_factor=0.18215,
                 guidance_channels=c, schedule={"kind": "scaled_linear", "num_timesteps": 1000}, vae=vae, io=io,
                 created_by="tests/cpp_goldens.py", text_encoder=text, tokenizer=tokenizer, scheduler=dict(SD15_PNDM))
    (dst / "manifest.json").write_text(m.to_json() + "\n")


# --- the manifest conformance corpus ----------------------------------------------------------------------
WHERE = "<manifest>"  # how both readers name the manifest in these messages


def _op(op: str, path: str, value: object = None) -> dict:
    return {"op": op, "path": path} if op == "remove" else {"op": op, "path": path, "value": value}


def _set(path: str, value: object) -> dict:
    # RFC 6902: "add" sets an object member (new or not); an array element is replaced, not inserted before
    return _op("replace" if path.rsplit("/", 1)[-1].isdigit() else "add", path, value)


# (name, base, patch): hostile edits of the toy bundles' manifests (tests/test_hostile_inputs.py's
# MANIFEST_CASES and more), each refused by Python with a message that names the field.
MANIFEST_CASES = [
    ("newer format version", "dit", [_set("/format_version", 2)]),
    ("format version 0", "dit", [_set("/format_version", 0)]),
    ("format version as text", "dit", [_set("/format_version", "1")]),
    ("format version as float", "dit", [_set("/format_version", 1.0)]),
    ("foreign format", "dit", [_set("/format", "other")]),
    ("no format", "dit", [_op("remove", "/format")]),
    ("JSON array", "dit", [_op("replace", "", [1, 2, 3])]),
    ("unknown pipeline kind", "dit", [_set("/pipeline", "video-diffusion")]),
    ("cosine schedule", "dit", [_set("/schedule/kind", "cosine")]),
    ("timesteps as text", "dit", [_set("/schedule/num_timesteps", "1000")]),
    ("one timestep", "dit", [_set("/schedule/num_timesteps", 1)]),
    ("unknown schedule field", "dit", [_set("/schedule/offset", 1)]),
    ("negative batch range", "dit", [_set("/models/0/engines/trt/batch_range", [-4, 8])]),
    ("short batch range", "dit", [_set("/models/0/engines/trt/batch_range", [4])]),
    ("empty batch range", "dit", [_set("/models/1/engines/trt/batch_range", [8, 2])]),
    ("unknown top-level field", "dit", [_set("/sampler_override", "euler")]),
    ("two unknown fields", "dit", [_set("/zeta", 1), _set("/alpha", 2)]),
    ("unknown backend key", "dit", [_set("/models/0/engines/cuda", {"file": "x", "sha256": "0" * 64})]),
    ("no engines", "dit", [_set("/models/0/engines", {})]),
    ("unknown engine field", "dit", [_set("/models/1/engines/trt/speed", "fast")]),
    ("malformed checksum", "dit", [_set("/models/0/engines/trt/sha256", "abc")]),
    ("upper-case checksum", "dit", [_set("/models/0/engines/trt/sha256", "A" * 64)]),
    ("missing checksum", "dit", [_op("remove", "/models/1/engines/trt/sha256")]),
    ("parent path", "dit", [_set("/models/0/engines/trt/file", "../../elsewhere/x.plan")]),
    ("absolute path", "dit", [_set("/models/0/engines/trt/file", "/etc/passwd")]),
    ("inner parent path", "dit", [_set("/models/0/engines/trt/file", "trt/../../x.plan")]),
    ("backslash path", "dit", [_set("/models/0/engines/trt/file", "trt\\..\\x.plan")]),
    ("home path", "dit", [_set("/models/0/engines/trt/file", "~/x.plan")]),
    ("dot path", "dit", [_set("/models/0/engines/trt/file", "./trt/x.plan")]),
    ("external data leaving", "dit", [_set("/models/0/engines/trt/extra",
                                          {"external_data": [{"file": "../x.data", "sha256": "0" * 64}]})]),
    ("unknown extra field", "dit", [_set("/models/0/engines/trt/extra", {"weights": "x"})]),
    ("unknown precision", "dit", [_set("/models/0/engines/trt/precision", "int4")]),
    ("unknown builder module", "dit", [_set("/models/0/engines/trt/builder/module", "onnx")]),
    ("bad compute capability", "dit", [_set("/models/1/engines/trt/builder/compute_capabilities", ["ampere"])]),
    ("missing arch field", "dit", [_op("remove", "/models/0/arch/depth")]),
    ("arch field as text", "dit", [_set("/models/1/arch/depth", "3")]),
    ("bool as depth", "dit", [_set("/models/1/arch/depth", True)]),
    ("huge depth", "dit", [_set("/models/0/arch/depth", 10**9)]),
    ("unknown arch field", "dit", [_set("/models/0/arch/dropout", 0.1)]),
    ("unknown family", "dit", [_set("/models/0/family", "vae")]),
    ("unknown model field", "dit", [_set("/models/0/speed", 3)]),
    ("nameless model", "dit", [_op("remove", "/models/1/name")]),
    ("latent shapes differ", "dit", [_set("/models/1/arch/input_size", 8)]),
    ("class counts differ", "dit", [_set("/num_classes", 12)]),
    ("patch does not divide", "dit", [_set("/models/0/arch/patch_size", 3)]),
    ("heads do not divide", "dit", [_set("/models/1/arch/hidden_size", 10), _set("/models/1/arch/num_heads", 4)]),
    ("guidance beyond channels", "dit", [_set("/guidance_channels", 99)]),
    ("zero guidance channels", "dit", [_set("/guidance_channels", 0)]),
    ("image size off", "dit", [_set("/image_size", 70)]),
    ("zero latent scale", "dit", [_set("/latent_scale_factor", 0)]),
    ("one model", "dit", [_op("remove", "/models/1")]),
    ("models not a list", "dit", [_set("/models", {"a": 1})]),
    ("vae of another kind", "dit", [_set("/vae", {"kind": "VQModel", "engines": {}})]),
    ("vae as text", "dit", [_set("/vae", "AutoencoderKL")]),
    ("io shape off", "dit", [_set("/io/inputs/x/shape", ["B", 3, 4, 4])]),
    ("per-tensor role", "dit", [_set("/io/inputs/x/role", "state")]),
    ("bfloat16 tensor", "dit", [_set("/io/inputs/noise/dtype", "bfloat16")]),
    ("fractional dim", "dit", [_set("/io/inputs/x/shape/1", 1.5)]),
    ("unknown step role", "dit", [_set("/io/roles", {"state": [["x", "x_next"]], "step": ["sigma"], "request": []})]),
    ("state triple", "dit", [_set("/io/roles", {"state": [["x", "x_next", "x0"]], "step": [], "request": []})]),
    ("unknown io field", "dit", [_set("/io/layout", "nchw")]),
    ("scheduler on a DiT bundle", "dit",
     [_set("/scheduler", {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear"})]),
    ("bf16 verdict without safe", "dit", [_set("/models/0/bf16", {"reason": "x"})]),
    ("created_by a number", "dit", [_set("/created_by", 7)]),
    ("DiT model in an SD bundle", "sd", [_set("/models/0/family", "dit")]),
    ("SD without text encoder", "sd", [_op("remove", "/text_encoder")]),
    ("SD without vae", "sd", [_op("remove", "/vae")]),
    ("SD without roles", "sd", [_op("remove", "/io/roles")]),
    ("roles name a ghost", "sd", [_set("/io/roles/request/-", "pooled")]),
    ("roles miss a tensor", "sd", [_set("/io/roles/step", ["t", "coef"])]),
    ("cross-attention widths differ", "sd", [_set("/models/1/arch/cross_attention_dim", 16)]),
    ("text encoder width differs", "sd", [_set("/text_encoder/io/outputs/text_embeddings/shape/2", 16)]),
    ("unet without sample size", "sd", [_op("remove", "/models/0/arch/sample_size")]),
    ("unet sample size zero", "sd", [_set("/models/1/arch/sample_size", 0)]),
    ("scheduler without class", "sd", [_op("remove", "/scheduler/_class_name")]),
    ("scheduler beta_start zero", "sd", [_set("/scheduler/beta_start", 0)]),
    ("scheduler offset as text", "sd", [_set("/scheduler/steps_offset", "1")]),
    ("tokenizer of another kind", "sd", [_set("/tokenizer/kind", "bpe")]),
    ("tokenizer path leaving", "sd", [_set("/tokenizer/file/file", "../tokenizer.json")]),
    ("hidden state unknown", "sd", [_set("/text_encoder/hidden_state", "middle")]),
    ("text encoder unknown field", "sd", [_set("/text_encoder/pooling", "mean")]),
    ("dim range of two", "sd", [_set("/io/dim_ranges/H", [2, 8])]),
    ("dim range zero", "sd", [_set("/io/dim_ranges/W", [0, 4, 8])]),
    ("unknown SD schedule", "sd", [_set("/schedule/kind", "squaredcos_cap_v2")]),
    # issue 12: SDXL, ControlNet, LCM guidance embedding, LoRA
    ("SDXL without text_encoder_2", "sdxl", [_op("remove", "/text_encoder_2")]),
    ("SDXL without tokenizer_2", "sdxl", [_op("remove", "/tokenizer_2")]),
    ("SDXL without conditioning", "sdxl", [_op("remove", "/conditioning")]),
    ("SDXL conditioning null", "sdxl", [_set("/conditioning", None)]),
    ("SDXL without text_embeds_dim", "sdxl", [_op("remove", "/conditioning/text_embeds_dim")]),
    ("SDXL without force_zeros", "sdxl", [_op("remove", "/conditioning/force_zeros_for_empty_prompt")]),
    ("SDXL time_ids not 6", "sdxl", [_set("/conditioning/time_ids", 5)]),
    ("SDXL text_embeds_dim zero", "sdxl", [_set("/conditioning/text_embeds_dim", 0)]),
    ("SDXL force_zeros as text", "sdxl", [_set("/conditioning/force_zeros_for_empty_prompt", "yes")]),
    ("SDXL DiT model", "sdxl", [_set("/models/1/family", "dit")]),
    ("SDXL text widths do not sum", "sdxl", [_set("/text_encoder_2/io/outputs/text_embeddings/shape/2", 8)]),
    ("SDXL pooled width differs", "sdxl", [_set("/conditioning/text_embeds_dim", 7)]),
    ("ControlNet without control_image", "sdxl", [_set("/conditioning/controlnet", {
        "family": "sdxl", "conditioning_channels": 3, "engines": {}})]),
    ("SDXL pooled width symbolic", "sdxl", [_set("/text_encoder_2/io/outputs/text_embeds/shape/1", "P")]),
    ("text encoder 2 of another kind", "sdxl", [_set("/text_encoder_2/kind", "T5EncoderModel")]),
    ("text encoder 2 pooled as text", "sdxl", [_set("/text_encoder_2/pooled", "yes")]),
    ("text encoder 2 empty batch range", "sdxl", [_set("/text_encoder_2/engines/trt/batch_range", [4, 2])]),
    ("tokenizer_2 path leaving", "sdxl", [_set("/tokenizer_2/file/file", "../tokenizer.json")]),
    ("SDXL roles name a ghost", "sdxl", [_set("/io/roles/request/-", "pooled")]),
    ("SDXL roles miss time_ids", "sdxl", [_set("/io/roles/request", ["context", "text_embeds", "guidance"])]),
    ("unknown guidance mode", "lcm", [_set("/conditioning/guidance", "distilled")]),
    ("conditioning without guidance", "lcm", [_op("remove", "/conditioning/guidance")]),
    ("conditioning unknown field", "lcm", [_set("/conditioning/strength", 2)]),
    ("conditioning as a list", "lcm", [_set("/conditioning", ["embedding"])]),
    ("ControlNet of another family", "control", [_set("/conditioning/controlnet/family", "sd3")]),
    ("ControlNet without engines", "control", [_op("remove", "/conditioning/controlnet/engines")]),
    ("ControlNet without family", "control", [_op("remove", "/conditioning/controlnet/family")]),
    ("ControlNet zero channels", "control", [_set("/conditioning/controlnet/conditioning_channels", 0)]),
    ("ControlNet unknown field", "control", [_set("/conditioning/controlnet/guess_mode", True)]),
    ("control_image without a ControlNet", "control", [_set("/conditioning/controlnet", None)]),
    ("ControlNet path leaving", "control", [_set("/conditioning/controlnet/engines/torch/file", "../cn.safetensors")]),
    ("ControlNet empty batch range", "control", [_set("/conditioning/controlnet/engines/torch/batch_range", [3, 1])]),
    ("unknown control step role", "control", [_set("/io/roles/step/3", "control_weight")]),
    ("roles miss control_scale", "control", [_set("/io/roles/step", ["t", "coef", "noise"])]),
    ("lora without checksum", "lcm", [_set("/models/0/lora", [{"source": "lcm.safetensors", "scale": 1.0}])]),
    ("lora scale out of range", "lcm", [_set("/models/1/lora", [{"source": "x", "sha256": "0" * 64, "scale": 1000}])]),
    ("lora unknown field", "lcm",
     [_set("/models/1/lora", [{"source": "x", "sha256": "0" * 64, "scale": 1, "alpha": 8}])]),
    ("lora not a list", "lcm", [_set("/models/0/lora", "lcm.safetensors")]),
    ("DiT with conditioning", "dit", [_set("/conditioning", {"guidance": "cfg"})]),
    ("DiT with text_encoder_2", "dit",
     [_set("/text_encoder_2", {"kind": "CLIPTextModelWithProjection", "hidden_state": "penultimate", "io": {},
                               "engines": {"trt": {"file": "te2/x.plan", "sha256": "0" * 64}}})]),
    # feature caching (DeepCache, FORA): the scheme of the bundle kind; cache, io.roles.cache and every model's cached
    # graphs together; a cached graph for every kind a model has
    ("DeepCache without cached graphs", "sd", [_set("/cache", {"scheme": "deepcache", "branch": 0})]),
    ("FORA on an SD bundle", "sd", [_set("/cache", {"scheme": "fora"})]),
    ("DeepCache on a DiT bundle", "dit", [_set("/cache", {"scheme": "deepcache", "branch": 0})]),
    ("cache role without cache", "sd", [_set("/io/roles/cache", [["deep", "deep_next"]])]),
    ("one model without a cached graph", "sd",
     [_set("/cache", {"scheme": "deepcache", "branch": 0}), _set("/io/roles/cache", [["deep", "deep_next"]]),
      _set("/models/0/cached", {"feature": {"shape": ["2B", 8, "H", "W"], "dtype": "float32"},
                                "engines": {"trt": {"file": "trt/0-cached.plan", "sha256": "0" * 64}}})]),
    ("a cached graph missing for a kind", "sd",
     [_set("/cache", {"scheme": "deepcache", "branch": 0}), _set("/io/roles/cache", [["deep", "deep_next"]])]
     + [_set(f"/models/{i}/cached", {"feature": {"shape": ["2B", 8, "H", "W"], "dtype": "float32"}, "engines": {}})
        for i in (0, 1)]),
]


def _pointer(doc: object, path: str) -> tuple[object, str | int]:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]
    for p in parts[:-1]:
        doc = doc[int(p)] if isinstance(doc, list) else doc[p]
    last = parts[-1]
    return doc, (len(doc) if last == "-" else int(last)) if isinstance(doc, list) else last


def apply_patch(doc: object, patch: list[dict]) -> object:
    """RFC 6902 add / replace / remove (what the corpus uses; the C++ test applies nlohmann's json::patch)."""
    import copy

    doc = copy.deepcopy(doc)
    for op in patch:
        if op["path"] == "":
            doc = copy.deepcopy(op["value"])
            continue
        parent, key = _pointer(doc, op["path"])
        if op["op"] == "remove":
            del parent[key]
        elif op["op"] == "add" and isinstance(parent, list):
            parent.insert(key, copy.deepcopy(op["value"]))
        else:
            parent[key] = copy.deepcopy(op["value"])
    return doc


def python_refusal(raw: object) -> str | None:
    """What Python's manifest reader says about `raw` (schema, then Manifest.validate); None if accepted."""
    from tstitch_trt.bundle.manifest import Manifest
    from tstitch_trt.bundle.schema import validate_schema
    from tstitch_trt.errors import BundleError

    try:
        validate_schema(raw, WHERE)
        Manifest.from_dict(raw).validate()
    except BundleError as e:
        return str(e)
    return None


def manifest_cases_golden(bases: dict[str, Path]) -> dict:
    docs = {name: json.loads((path / "manifest.json").read_text()) for name, path in bases.items()}
    cases = []
    for name, base, patch in MANIFEST_CASES:
        assert python_refusal(docs[base]) is None, f"the {base} base manifest must be valid"
        message = python_refusal(apply_patch(docs[base], patch))
        assert message is not None, f"manifest case {name!r} is accepted by Python; it must be a refusal"
        # schema violations name the field first ("<manifest>: models[0].arch lacks ..."); consistency rules
        # (Manifest.validate) are worded without a field path
        prefix = WHERE + ": "
        clause = message[len(prefix):] if message.startswith(prefix) else ""
        field = "the manifest" if clause.startswith("the manifest ") else clause.split(" ")[0]
        cases.append({"name": name, "base": base, "patch": patch, "message": message, "field": field})
    return {"where": WHERE, "bases": docs, "cases": cases}


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
            trt = make_fake_trt(cu, toy_step_for(), flavour="trt-10.13")
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


def sd_toy_eps(x_in, t, context, g, scale: float):  # noqa: ANN001, ANN201 (torch tensors)
    """The C++ fake SD engine's stand-in U-Net: guided eps from (c_in x, t, both ends of each context row)."""
    import torch

    b = x_in.shape[0]
    ends = context.reshape(2 * b, -1)
    ctx = ends[:, 0] + ends[:, -1]
    lift = (t * torch.tensor(1e-3, dtype=torch.float32)).reshape(b, 1, 1, 1)
    u = torch.tanh(scale * x_in + lift + ctx[:b].reshape(b, 1, 1, 1))
    c = torch.tanh(scale * x_in + lift + ctx[b:].reshape(b, 1, 1, 1))
    return u + g * (c - u)


# (sampler (None: the bundle scheduler's), eta, steps, ratio, cfg, batch, seed, latent (h, w) (None: the U-Net's))
SD_LOOP_CASES = [("pndm", 0.0, 5, 0.4, 7.5, 2, 0, None), ("euler", 0.0, 4, 0.5, 7.5, 1, 1, None),
                 ("dpm-solver++", 0.0, 6, 0.5, 3.0, 2, 2, None), ("ddim", 0.5, 4, 0.0, 1.0, 2, 3, None),
                 (None, 0.0, 3, 1.0, 5.0, 1, 4, None), ("euler", 0.0, 3, 0.5, 7.5, 2, 5, (6, 2))]


def sd_loop_golden(bundle: Path) -> dict:
    """SD toy trajectories: pipeline/sd.py's plan (table, stitch by call, noise order, init_noise_sigma, cfg rule)
    and export/unet_step.py's sd_sampler_update, stepping the four state pairs; the C++ loop runs the same."""
    import torch

    from tstitch_trt.bundle.manifest import read_manifest
    from tstitch_trt.export.unet_step import sd_sampler_update
    from tstitch_trt.pipeline.dit import to_uint8
    from tstitch_trt.sampling.sd_samplers import HISTORY, C, sd_needs_noise, sd_table
    from tstitch_trt.sampling.stitch import stitch_schedule_by_call

    manifest = read_manifest(bundle)
    c, sample_h, sample_w = manifest.latent_shape
    n_tok, width = SD_TOY_TEXT
    runs = []
    for sampler, eta, steps, ratio, cfg, batch, seed, size in SD_LOOP_CASES:
        h, w = size or (sample_h, sample_w)  # the request's height/width // the VAE factor
        name = sampler or "pndm"  # None: the bundle scheduler's sampler (SD 1.5: PNDM)
        rng = np.random.default_rng(seed)
        x_unit = rng.standard_normal((batch, c, h, w), dtype=np.float32)
        table = sd_table(name, manifest.scheduler, steps, eta)
        n_calls = len(table.timesteps)
        step_model = stitch_schedule_by_call(n_calls, 2, ratio=ratio)
        noise = rng.standard_normal((n_calls, batch, c, h, w), dtype=np.float32) if sd_needs_noise(name, eta) else None
        context = np.random.default_rng(100 + seed).standard_normal((2 * batch, n_tok, width), dtype=np.float32)
        g = torch.tensor(cfg if cfg > 1 else 1.0, dtype=torch.float32)
        x = torch.from_numpy(x_unit * np.float32(table.init_noise_sigma))
        prev, hist, saved = torch.zeros_like(x), torch.zeros(batch, HISTORY, c, h, w), torch.zeros_like(x)
        for i in range(n_calls):
            coef = torch.from_numpy(table.coef[i])
            t = torch.full((batch,), float(table.timesteps[i]), dtype=torch.float32)
            eps = sd_toy_eps(coef[C["c_in"]] * x, t, torch.from_numpy(context), g, TOY_SCALES[int(step_model[i])])
            nz = torch.from_numpy(noise[i]) if noise is not None else torch.zeros_like(x)
            x, prev, hist, saved = sd_sampler_update(x, eps, coef, prev, hist, saved, nz)
        # pipeline/sd.py's decode: to_uint8(vae(latents / np.float32(latent_scale_factor))), (B, H, W, 3)
        rgb = to_uint8(toy_vae(x.numpy() / np.float32(manifest.latent_scale_factor)))
        runs.append({"sampler": sampler, "eta": eta, "steps": steps, "ratio": ratio, "cfg": cfg, "batch": batch,
                     "seed": seed, "latent_hw": [h, w], "context_bits": f32_bits(context),
                     "step_model": step_model.tolist(), "x": [float(v) for v in x.numpy().ravel()],
                     "rgb": rgb.ravel().tolist()})
    return {"runs": runs}


# --- issue 12: step graphs conditioned beyond the text context (SDXL, ControlNet, LCM's guidance embedding) ---
SDXL_EULER = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
              "timestep_spacing": "leading", "interpolation_type": "linear", "use_karras_sigmas": False,
              "prediction_type": "epsilon"}
LCM_CONFIG = {"_class_name": "LCMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "num_train_timesteps": 1000, "original_inference_steps": 50, "timestep_scaling": 10.0,
              "set_alpha_to_one": True, "steps_offset": 0, "prediction_type": "epsilon", "clip_sample": False,
              "timestep_spacing": "leading"}
TOY_TEXT_EMBEDS = 5  # SDXL toy: the pooled text_embeds width
TOY_CONTROL_CHANNELS = 3
# bundle dir name -> (pipeline, StepConditions fields, scheduler config)
TOY_COND_BUNDLES = {"toy_sdxl": ("sdxl", {"guidance": "cfg", "added": True}, SDXL_EULER),
                    "toy_control": ("sd", {"guidance": "cfg", "control": True}, SD15_PNDM),
                    "toy_lcm": ("sd", {"guidance": "embedding"}, LCM_CONFIG)}


def write_toy_cond_bundle(dst: Path) -> None:
    """A TOY_COND_BUNDLES bundle: the step graph's io is export/unet_export.py's unet_io_spec for those
    StepConditions (so the contract, not a copy of it), toy "TOYSD ...,[A][C]" plans for the C++ fake engine."""
    from types import SimpleNamespace

    from tstitch_trt.bundle.manifest import EngineEntry, Manifest, ModelEntry, sha256_file
    from tstitch_trt.export.unet_export import unet_io_spec
    from tstitch_trt.export.unet_step import StepConditions
    from tstitch_trt.sampling.sd_samplers import SD_NUM_COEFS

    pipeline, fields, scheduler = TOY_COND_BUNDLES[dst.name]
    cond = StepConditions(**fields)
    if dst.exists():
        shutil.rmtree(dst)
    for d in ("trt", "text_encoder", "tokenizer", "vae", "text_encoder_2", "tokenizer_2", "controlnet"):
        (dst / d).mkdir(parents=True)
    c, s = SD_TOY_LATENT[0], SD_TOY_LATENT[1]
    n_tok, width = SD_TOY_TEXT

    def entry(rel: str, data: bytes) -> EngineEntry:
        (dst / rel).write_bytes(data)
        return EngineEntry(file=rel, sha256=sha256_file(dst / rel), batch_range=(1, 4), builder=dict(TOY_BUILDER))

    step = SimpleNamespace(conditions=cond, channels=c, sample_size=s, cross_attention_dim=width,
                           text_embeds_dim=TOY_TEXT_EMBEDS if cond.added else 0,
                           control_channels=TOY_CONTROL_CHANNELS if cond.control else 0)
    io = unet_io_spec(step, n_tok, TOY_VAE_FACTOR)
    flags = ("A" if cond.added else "") + ("C" if cond.control else "")
    models = []
    for i, scale in enumerate(TOY_SCALES):
        plan = b"TOYSD" + f"{c},{s},{s},{SD_NUM_COEFS},{scale},{flags}".encode() + b"#" * 64 * (i + 1)
        arch = {"in_channels": c, "out_channels": c, "sample_size": s, "cross_attention_dim": width}
        if cond.added:
            arch["addition_embed_type"] = "text_time"
        if cond.guidance == "embedding":
            arch["time_cond_proj_dim"] = 4
        models.append(ModelEntry(name=f"ToyUNet-{'SL'[i]}", family="unet", arch=arch,
                                 engines={"trt": entry(f"trt/{i}-toy-unet.plan", plan)}))
    f32 = "float32"

    def encoder(sub: str, pooled: bool) -> dict:
        # SDXL: the two encoders' hidden states concatenate to the U-Nets' cross-attention width
        own = width // 2 if pipeline == "sdxl" else width
        outputs = {"text_embeddings": {"shape": ["N", n_tok, own], "dtype": f32}}
        if pooled:
            outputs["text_embeds"] = {"shape": ["N", TOY_TEXT_EMBEDS], "dtype": f32}
        enc = {"source": "toy", "kind": "CLIPTextModelWithProjection" if pooled else "CLIPTextModel",
               "hidden_state": "penultimate-raw" if pipeline == "sdxl" else "last",
               "engines": {"trt": entry(f"{sub}/toy.plan", b"TOYTEXT" + f"{n_tok},{own},".encode())},
               "io": {"inputs": {"input_ids": {"shape": ["N", n_tok], "dtype": "int64"}}, "outputs": outputs,
                      "dim_ranges": {"N": [1, 2, 8]}}}
        if pooled:
            enc["pooled"] = True
        return enc

    def tokenizer(sub: str) -> dict:
        tok = dst / sub / "tokenizer.json"
        tok.write_text("{}\n")
        return {"file": {"file": f"{sub}/tokenizer.json", "sha256": sha256_file(tok)}, "max_length": n_tok, "pad_id": 0,
                "kind": "clip"}

    conditioning: dict = {"guidance": cond.guidance}
    extra: dict = {}
    if pipeline == "sdxl":
        conditioning.update({"force_zeros_for_empty_prompt": True, "text_embeds_dim": TOY_TEXT_EMBEDS, "time_ids": 6})
        extra = {"text_encoder_2": encoder("text_encoder_2", True), "tokenizer_2": tokenizer("tokenizer_2")}
    if cond.control:
        conditioning["controlnet"] = {"source": "toy", "family": "sd", "conditioning_channels": TOY_CONTROL_CHANNELS,
                                      "engines": {"torch": entry("controlnet/toy.safetensors", b"toy controlnet")}}
    vae = {"source": "toy", "kind": "AutoencoderKL",
           "engines": {"trt": entry("vae/toy.plan", b"TOYVAE" + f"{TOY_VAE_FACTOR},".encode())}}
    m = Manifest(pipeline=pipeline, models=models, num_classes=0, image_size=TOY_VAE_FACTOR * s,
                 latent_scale_factor=0.13025 if pipeline == "sdxl" else 0.18215, guidance_channels=c,
                 schedule={"kind": "scaled_linear", "num_timesteps": 1000}, vae=vae, io=io,
                 created_by="tests/cpp_goldens.py", text_encoder=encoder("text_encoder", False),
                 tokenizer=tokenizer("tokenizer"), scheduler=dict(scheduler), conditioning=conditioning, **extra)
    (dst / "manifest.json").write_text(m.to_json() + "\n")


def toy_unet_eps(x_in, t, cond: dict, g, scale: float, control_scale: float, cfg: bool):  # noqa: ANN001, ANN201
    """The C++ fake SD engine's stand-in U-Net (FakeSdContext), float32: one conditioning value per row from both
    ends of the context row (+ SDXL: text_embeds and time_ids), a ControlNet residual per item from both ends of
    its image (guess mode halves it and under cfg drops it from the uncond half); cfg: guided u + g (c - u);
    "embedding": one call with (g - 1) added, as LCM's guidance embedding enters."""
    import torch

    f = torch.float32
    b = x_in.shape[0]
    rows = cond["context"].shape[0]
    ends = cond["context"].reshape(rows, -1)
    c = ends[:, 0] + ends[:, -1]
    if "text_embeds" in cond:
        te, ti = cond["text_embeds"], cond["time_ids"]
        half, milli = torch.tensor(0.5, dtype=f), torch.tensor(1e-3, dtype=f)
        c = c + (te[:, 0] - te[:, -1]) * half + (ti[:, 0] + ti[:, 2] + ti[:, 5]) * milli
    res_u = res_c = torch.zeros(b, dtype=f)
    if "control_image" in cond:
        img = cond["control_image"].reshape(b, -1)
        guess = cond["control_guess"].to(f)
        weight = torch.tensor(control_scale, dtype=f)  # the engine reads control_scale as float32
        res_c = (img[:, 0] + img[:, -1]) * weight * (1 - torch.tensor(0.5, dtype=f) * guess)
        res_u = res_c * (1 - guess) if cfg else res_c
    lift = (t * torch.tensor(1e-3, dtype=f)).reshape(b, 1, 1, 1)
    col = [v.reshape(b, 1, 1, 1) for v in (c[:b], res_u, res_c)]
    if not cfg:
        return torch.tanh(scale * x_in + lift + col[0] + col[2] + (g - 1) * torch.tensor(0.05, dtype=f))
    u = torch.tanh(scale * x_in + lift + col[0] + col[1])
    v = torch.tanh(scale * x_in + lift + c[b:].reshape(b, 1, 1, 1) + col[2])
    return u + g * (v - u)


def control_keep(calls: int, start: float, end: float) -> list[float]:
    """diffusers' ControlNet pipelines: controlnet_keep[i] = 1 - float(i / n < start or (i + 1) / n > end)."""
    return [1.0 - float(i / calls < start or (i + 1) / calls > end) for i in range(calls)]


class _NoiseFeed:
    """Stands in for diffusers.utils.torch_utils.randn_tensor inside LCMScheduler.step: hands out the given
    noise in order, so diffusers' own update runs on the noise the runtime draws."""

    def __init__(self, noise):  # noqa: ANN001
        self.noise, self.used = list(noise), 0

    def __call__(self, shape, **_):  # noqa: ANN001, ANN003, ANN204
        import torch

        out = torch.as_tensor(self.noise[self.used]).reshape(shape)
        self.used += 1
        return out


def lcm_scheduler(config: dict):  # noqa: ANN201
    from diffusers import LCMScheduler

    return LCMScheduler.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def lcm_steps(config: dict, steps: int, x, eps_of, noise):  # noqa: ANN001, ANN201
    """x after each LCMScheduler.step (diffusers itself), eps_of(i, x) the model output of call i, noise[i] the
    noise step i injects (the last step injects none)."""
    from unittest import mock

    sched = lcm_scheduler(config)
    sched.set_timesteps(steps)
    feed = _NoiseFeed(noise)
    out = []
    with mock.patch("diffusers.schedulers.scheduling_lcm.randn_tensor", feed):
        for i, t in enumerate(sched.timesteps):
            x = sched.step(eps_of(i, x, int(t)), t, x, return_dict=False)[0]
            out.append(x)
    assert feed.used == len(sched.timesteps) - 1
    return sched, out


LCM_GOLDEN_CONFIGS = {
    "lcm-sdxl": LCM_CONFIG,
    "lcm-orig25-scale5": {**LCM_CONFIG, "original_inference_steps": 25, "timestep_scaling": 5.0},
    "lcm-linear-no-alpha-one": {**LCM_CONFIG, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                                "set_alpha_to_one": False},
}


def lcm_golden() -> dict:
    """diffusers' LCMScheduler itself, no table of ours: timesteps, the per-call boundary scalings and alphas from its
    own alphas_cumprod / get_scalings_for_boundary_condition_discrete, and whole trajectories on given model outputs
    and noise (float32). The C++ lcm table must reproduce them."""
    import torch

    cases = []
    for name, cfg in LCM_GOLDEN_CONFIGS.items():
        for steps in (1, 2, 4, 8, 25):
            if steps > cfg["original_inference_steps"]:
                continue
            rng = np.random.default_rng(steps)
            x0 = rng.standard_normal((1, 2, 2, 2), dtype=np.float32)
            eps = rng.standard_normal((steps, 1, 2, 2, 2), dtype=np.float32)
            noise = rng.standard_normal((steps, 1, 2, 2, 2), dtype=np.float32)
            given = lambda i, x, t, e=eps: torch.from_numpy(e[i])  # noqa: E731 (the model output of call i)
            sched, xs = lcm_steps(cfg, steps, torch.from_numpy(x0), given, noise)
            ts = [int(t) for t in sched.timesteps]
            rows = []
            for i, t in enumerate(ts):
                prev = ts[i + 1] if i + 1 < len(ts) else t
                a = float(sched.alphas_cumprod[t])
                a_prev = float(sched.alphas_cumprod[prev]) if prev >= 0 else float(sched.final_alpha_cumprod)
                c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(t)
                rows.append({"alpha": a, "alpha_prev": a_prev, "c_skip": float(c_skip), "c_out": float(c_out)})
            cases.append({"config": name, "steps": steps, "timesteps": ts, "rows": rows, "x_init": x0.ravel().tolist(),
                          "eps": eps.reshape(steps, -1).tolist(), "noise": noise.reshape(steps, -1).tolist(),
                          "x": [x.numpy().ravel().tolist() for x in xs]})
    return {"configs": LCM_GOLDEN_CONFIGS, "cases": cases}


# (bundle, sampler, eta, steps, ratio, cfg, batch, seed, latent (h, w) or None, time_ids given, control (scale,
# start, end, guess) or None)
SD_COND_CASES = [
    ("toy_sdxl", "euler", 0.0, 4, 0.5, 5.0, 2, 0, None, True, None),
    ("toy_sdxl", None, 0.0, 3, 0.4, 7.5, 1, 1, (6, 2), False, None),  # default time_ids at 48 x 16 px
    ("toy_sdxl", "dpm-solver++", 0.0, 5, 0.4, 1.0, 2, 2, None, False, None),
    ("toy_control", "pndm", 0.0, 4, 0.4, 7.5, 2, 3, None, False, (0.8, 0.0, 1.0, 0)),
    ("toy_control", "euler", 0.0, 6, 0.5, 4.0, 1, 4, (2, 6), False, (1.5, 0.2, 0.7, 1)),
    ("toy_control", "ddim", 0.5, 5, 0.6, 3.0, 2, 5, None, False, (0.5, 0.0, 0.6, 1)),
    ("toy_lcm", "lcm", 0.0, 4, 0.5, 8.5, 2, 6, None, False, None),
    ("toy_lcm", None, 0.0, 2, 0.5, 1.0, 1, 7, None, False, None),
    ("toy_lcm", "lcm", 0.0, 8, 0.25, 3.0, 1, 8, (8, 4), False, None),
]


def sd_cond_loop_golden(bundles: Path) -> dict:
    """Toy trajectories on the TOY_COND_BUNDLES bundles: cfg bundles step pipeline/sd.py's plan (table, stitch by
    call, noise order, init_noise_sigma, cfg rule) through export/unet_step.py's sd_sampler_update; the LCM bundle
    steps diffusers' LCMScheduler itself on the same noise (the runtime draws one noise row per call, after the
    initial latent). control_scale per call is conditioning scale x diffusers' keep."""
    import torch

    from tstitch_trt.bundle.manifest import read_manifest
    from tstitch_trt.export.unet_step import sd_sampler_update
    from tstitch_trt.sampling.sd_samplers import HISTORY, C, sd_needs_noise, sd_table
    from tstitch_trt.sampling.stitch import stitch_schedule_by_call

    n_tok, width = SD_TOY_TEXT
    runs = []
    for (bundle, sampler, eta, steps, ratio, cfg, batch, seed, size, give_time_ids,
         control) in SD_COND_CASES:
        manifest = read_manifest(bundles / bundle)
        c, sample_h, sample_w = manifest.latent_shape
        h, w = size or (sample_h, sample_w)
        name = sampler or {"toy_lcm": "lcm", "toy_sdxl": "euler"}.get(bundle, "pndm")
        guided = manifest.guidance_mode == "cfg"
        rows = 2 * batch if guided else batch
        rng = np.random.default_rng(seed)
        x_unit = rng.standard_normal((batch, c, h, w), dtype=np.float32)
        inputs_rng = np.random.default_rng(100 + seed)
        context = inputs_rng.standard_normal((rows, n_tok, width), dtype=np.float32)
        named: dict[str, np.ndarray] = {}
        if bundle == "toy_sdxl":
            named["text_embeds"] = inputs_rng.standard_normal((rows, TOY_TEXT_EMBEDS), dtype=np.float32)
            px = (TOY_VAE_FACTOR * h, TOY_VAE_FACTOR * w)
            default = np.array([*px, 0, 0, *px], dtype=np.float32)
            named["time_ids"] = (inputs_rng.integers(0, 1024, (rows, 6)).astype(np.float32) if give_time_ids
                                 else np.tile(default, (rows, 1)))
        if control:
            named["control_image"] = inputs_rng.uniform(0, 1, (batch, TOY_CONTROL_CHANNELS, TOY_VAE_FACTOR * h,
                                                                TOY_VAE_FACTOR * w)).astype(np.float32)
        g = torch.tensor(cfg if cfg > 1 else 1.0, dtype=torch.float32)
        cond = {"context": torch.from_numpy(context), **{k: torch.from_numpy(v) for k, v in named.items()}}
        if control:
            cond["control_guess"] = torch.tensor(float(control[3]))
        if name == "lcm":
            sched = lcm_scheduler(manifest.scheduler)
            sched.set_timesteps(steps)
            n_calls = len(sched.timesteps)
        else:
            table = sd_table(name, manifest.scheduler, steps, eta)
            n_calls = len(table.timesteps)
        step_model = stitch_schedule_by_call(n_calls, 2, ratio=ratio)
        scales = [control[0] * k for k in control_keep(n_calls, control[1], control[2])] if control else [0.0] * n_calls
        if name == "lcm":
            noise = rng.standard_normal((n_calls, batch, c, h, w), dtype=np.float32)

            def eps_of(i: int, x, t: int, n=batch, cond=cond, g=g, models=step_model, scales=scales,  # noqa: ANN001, ANN202
                       guided=guided):
                tt = torch.full((n,), float(t), dtype=torch.float32)
                return toy_unet_eps(x, tt, cond, g, TOY_SCALES[int(models[i])], scales[i], guided)

            _, xs = lcm_steps(manifest.scheduler, steps, torch.from_numpy(x_unit), eps_of, noise[:-1])
            x = xs[-1]
        else:
            noise = rng.standard_normal((n_calls, batch, c, h, w), dtype=np.float32) if sd_needs_noise(name, eta) \
                else None
            x = torch.from_numpy(x_unit * np.float32(table.init_noise_sigma))
            prev, hist, saved = torch.zeros_like(x), torch.zeros(batch, HISTORY, c, h, w), torch.zeros_like(x)
            for i in range(n_calls):
                coef = torch.from_numpy(table.coef[i])
                t = torch.full((batch,), float(table.timesteps[i]), dtype=torch.float32)
                eps = toy_unet_eps(coef[C["c_in"]] * x, t, cond, g, TOY_SCALES[int(step_model[i])], scales[i], guided)
                nz = torch.from_numpy(noise[i]) if noise is not None else torch.zeros_like(x)
                x, prev, hist, saved = sd_sampler_update(x, eps, coef, prev, hist, saved, nz)
        given = {k: f32_bits(v) for k, v in named.items() if k != "time_ids" or give_time_ids}
        runs.append({"bundle": bundle, "sampler": sampler, "eta": eta, "steps": steps, "ratio": ratio, "cfg": cfg,
                     "batch": batch, "seed": seed, "latent_hw": [h, w], "context_bits": f32_bits(context),
                     "inputs_bits": given, "control": list(control) if control else None,
                     "control_scale": [float(np.float32(v)) for v in scales] if control else None,
                     "step_model": step_model.tolist(), "x": [float(v) for v in x.numpy().ravel()]})
    return {"runs": runs}


def generate(golden: Path, toy_bundle: Path) -> None:
    golden.mkdir(parents=True, exist_ok=True)
    write_toy_bundle(toy_bundle)
    toy_sd = toy_bundle.parent / TOY_SD_BUNDLE.name
    write_toy_sd_bundle(toy_sd)
    for name in TOY_COND_BUNDLES:
        write_toy_cond_bundle(toy_bundle.parent / name)
    bases = {"dit": toy_bundle, "sd": toy_sd, "sdxl": toy_bundle.parent / "toy_sdxl",
             "control": toy_bundle.parent / "toy_control", "lcm": toy_bundle.parent / "toy_lcm"}
    for name, data in (("rng", rng_golden()), ("sampling", sampling_golden()), ("loop", loop_golden(toy_bundle)),
                       ("manifest_cases", manifest_cases_golden(bases)),
                       ("sd_sampling", sd_sampling_golden()), ("sd_loop", sd_loop_golden(toy_sd)),
                       ("lcm", lcm_golden()), ("sd_cond_loop", sd_cond_loop_golden(toy_bundle.parent))):
        (golden / f"{name}.json").write_text(json.dumps(data, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="write the goldens into cpp/tests")
    args = ap.parse_args()
    if not args.write:
        ap.error("pass --write to regenerate cpp/tests/golden and cpp/tests/data/toy_pair")
    generate(GOLDEN, TOY_BUNDLE)
    print(f"wrote {GOLDEN} and {TOY_BUNDLE}")
