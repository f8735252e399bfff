"""`tstitch-trt check`: every backend of a bundle against the torch StepModule (fp32, CPU).

One step per model on seeded inputs: x, prev_x0, noise ~ N(0, 1), random timestep and labels,
guidance 4 (CFG clearly active), and a coefficient row that exercises every term of the update
(DDPM learned-range variance and noise, plus the DPM-Solver++(2M) multistep weights on prev_x0).
Per model, backend and output (x_next, x0) it prints max abs error, max relative error and cosine
similarity. "Relative" is max|out - ref| / max|ref|: relative to the output's largest magnitude,
because element-wise ratios explode where the reference crosses zero.

Tolerances (max rel, min cosine), set from measurement on random-weight DiTs (every parameter
random, so nothing compares zeros with zeros) and kept with a margin of about 10x:

    fp32 graphs (ort, openvino) vs torch   rel <= 1e-4      cos >= 0.999999
        measured (batch 2, seed 0): rel <= 1e-6 on tiny pairs, 2.7e-6 (x0) on DiT-S/2 and
        DiT-XL/2 at 256; cosine 1 - 1e-12
    fp16 networks (trt, trt-rtx) vs fp32   rel <= 3e-2      cos >= 0.9995
        measured with the fp16 step graph in ONNX Runtime (CPU): rel 4.9e-4 (x_next) / 1.4e-3 (x0)
        on DiT-S/2, 6.4e-4 / 1.7e-3 on DiT-XL/2, cosine >= 0.9999994. TensorRT picks other fp16
        kernels, so the bound leaves ~20x; no engine was run here (no GPU) to narrow it.
    VAE decoder (ort / engines) vs torch   the same per precision, on the image
    bf16 (openvino, --precision bf16)      the bf16 gate: see export/bf16_gate.py (BF16_STEP_TOLERANCE)

Engines (trt, trt-rtx) need an NVIDIA GPU to run: without one they are reported as "not run"
(their plan checksums are still verified), never as passed. Exit status: 0 when every backend
that ran is within tolerance and at least one ran; 1 otherwise; 2 (UserError) for bad input, and where
torch is missing (cli.cmd_check runs the file checks, pipeline/integrity.py, then says in one line what to
install).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tstitch_trt.bundle.manifest import EngineEntry, Manifest, artifact_path, read_manifest, verify_bundle
from tstitch_trt.demo import resolve_bundle
from tstitch_trt.errors import UserError
from tstitch_trt.export.bf16_gate import BF16_STEP_TOLERANCE
from tstitch_trt.outputs import OutputPlan

TOLERANCES = {"fp32": {"max_rel": 1e-4, "min_cos": 0.999999}, "fp16": {"max_rel": 3e-2, "min_cos": 0.9995}}
ENGINE_KINDS = ("trt", "trt-rtx")
CHECKABLE = ("ort", "openvino", *ENGINE_KINDS)
ARTIFACT = {"openvino": "ort"}  # OpenVINO runs the fp32 ONNX graphs built for ort


@dataclass
class Comparison:
    model: str
    backend: str
    output: str
    precision: str
    status: str  # "ok", "FAIL", "not run"
    max_abs: float | None = None
    max_rel: float | None = None
    cosine: float | None = None
    note: str = ""
    tolerance: dict[str, float] = field(default_factory=dict)


def compare(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """max abs, max rel (to max |ref|) and cosine similarity; NaN/inf in `out` count as failure."""
    ref64, out64 = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
    if not np.isfinite(out64).all():
        return {"max_abs": math.inf, "max_rel": math.inf, "cosine": -1.0}
    diff = np.abs(out64 - ref64)
    scale = float(np.abs(ref64).max()) or 1.0
    denom = float(np.linalg.norm(ref64) * np.linalg.norm(out64))
    cos = float(ref64 @ out64 / denom) if denom > 0 else (1.0 if not diff.any() else 0.0)
    return {"max_abs": float(diff.max()), "max_rel": float(diff.max()) / scale, "cosine": cos}


def tolerance(precision: str, output: str) -> dict[str, float]:
    """The bound for `output` at `precision` (bf16 has one per output: see export/bf16_gate.py)."""
    if precision == "bf16":  # a step graph's other state (an SD U-Net's eps history): x0's sanity bound
        return BF16_STEP_TOLERANCE.get(output, BF16_STEP_TOLERANCE["x0"])
    return TOLERANCES[precision]


def within(metrics: dict[str, float], precision: str, output: str = "x_next") -> bool:
    tol = tolerance(precision, output)
    return metrics["max_rel"] <= tol["max_rel"] and metrics["cosine"] >= tol["min_cos"]


def step_inputs(manifest: Manifest, batch: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs for one step that exercise the whole update (see the module docstring)."""
    if manifest.text_to_image:
        return sd_step_inputs(manifest, batch, seed)
    from tstitch_trt.sampling.coefficients import coefficient_table
    from tstitch_trt.sampling.schedule import dit_schedule

    rng = np.random.default_rng(seed)
    lat = (batch, *manifest.latent_shape)
    schedule = dit_schedule(50, int(manifest.schedule.get("num_timesteps", 1000)))
    row = 20  # a mid-trajectory step: DDPM noise is on, DPM-Solver++ is second order
    coef = coefficient_table("ddpm", schedule)[row].copy()
    coef[2:4] = coefficient_table("dpm-solver++", schedule)[row][2:4]
    t = int(schedule.timesteps[::-1][row])
    return {
        "x": rng.standard_normal(lat, dtype=np.float32),
        "t": np.full((batch,), t, dtype=np.int64),
        "y": rng.integers(0, manifest.num_classes, size=batch, dtype=np.int64),
        "guidance": np.array(4.0, dtype=np.float32),
        "coef": coef.astype(np.float32),
        "prev_x0": rng.standard_normal(lat, dtype=np.float32),
        "noise": rng.standard_normal(lat, dtype=np.float32),
    }


def sd_step_inputs(manifest: Manifest, batch: int, seed: int) -> dict[str, np.ndarray]:
    """U-Net step: a PLMS 4th-order row with every other term switched on too (Euler input scale, DDIM-style
    noise, the DPM-Solver++ prev_x0 weight, a half-saved sample), random history, a random context."""
    from tstitch_trt.runtime.io_roles import StepIO
    from tstitch_trt.sampling.sd_samplers import C, sd_table

    io = StepIO.from_io(manifest.io)
    rng = np.random.default_rng(seed)
    dims = io.dims((batch, *manifest.latent_shape))
    row = sd_table("pndm", manifest.scheduler or {}, 20).coef[10].copy()
    row[C["c_in"]], row[C["k_s"]], row[C["d1"]], row[C["w_d"]] = 0.8, 0.25, -0.3, 0.2
    row[C["sigma"]], row[C["save"]] = 0.1, 0.5
    feeds = {n: rng.standard_normal(io.shape(n, dims), dtype=np.float32) for n in io.inputs}
    feeds.update({"t": np.full((batch,), 481.0, dtype=np.float32), "guidance": np.array(4.0, dtype=np.float32),
                  "coef": row.astype(np.float32)})
    if "control_image" in feeds:  # a ControlNet inside: an image in [0, 1], guess mode (its every term), a scale
        feeds.update({"control_image": rng.random(feeds["control_image"].shape, dtype=np.float32),
                      "control_guess": np.array(1.0, np.float32), "control_scale": np.array(0.8, np.float32)})
    return feeds


def run_check(args: argparse.Namespace, outputs: OutputPlan | None = None) -> int:
    """Compare; `outputs` holds the --report path, checked writable before any work."""
    bundle = resolve_bundle(args.bundle)
    manifest = read_manifest(bundle)
    verify_bundle(bundle, manifest, fresh=True)
    if args.batch < 1:
        raise UserError(f"--batch must be >= 1, got {args.batch}")
    present = sorted({k for m in manifest.models for k in m.engines if k in CHECKABLE}, key=CHECKABLE.index)
    if "ort" in present and _openvino_installed():
        present.insert(present.index("ort") + 1, "openvino")
    precision = getattr(args, "precision", "fp32")
    if getattr(args, "record", False) and precision != "bf16":
        raise UserError("--record writes the bf16 verdict; give --precision bf16 with it")
    wanted = present if not args.backend else [b.strip() for b in args.backend.split(",") if b.strip()]
    if precision == "bf16" and "ort" not in present:
        raise UserError("--precision bf16 runs the bundle's ONNX graphs on OpenVINO and this bundle has none; "
                        "rebuild it with --backend ort")
    if precision == "bf16" and "openvino" not in wanted:
        wanted.append("openvino")  # bf16 runs on OpenVINO; asking for it checks OpenVINO
    if "openvino" in wanted and "ort" in present and "openvino" not in present:
        from tstitch_trt.runtime.openvino_backend import import_openvino

        import_openvino()  # one line saying how to install it
    for b in wanted:
        if b not in CHECKABLE:
            raise UserError(f"--backend {b!r} cannot be checked; choose from {', '.join(CHECKABLE)} "
                            f"(torch is the reference)")
        if b not in present:
            raise UserError(f"the bundle has no {b} artifacts (it has: {', '.join(present) or 'none'})")
    missing = [m.name for m in manifest.models if "torch" not in m.engines]
    if missing:
        raise UserError(f"the bundle has no torch weights for {', '.join(missing)}, so there is no reference to "
                        f"check against; rebuild it with --backend torch,{','.join(wanted) or 'ort'}")
    if not wanted:
        raise UserError("the bundle has no ort, trt or trt-rtx artifacts to check (only torch weights)")
    feeds = step_inputs(manifest, args.batch, args.seed)
    print(f"check {bundle}: reference torch StepModule (fp32, CPU); batch {args.batch}, seed {args.seed}, "
          f"one step at t={int(feeds['t'][0])}")
    results = _check_models(bundle, manifest, wanted, feeds, bf16=precision == "bf16")
    results += _check_text_encoder(bundle, manifest, wanted, args.batch, args.seed, bf16=precision == "bf16")
    if manifest.vae and "torch" in manifest.vae["engines"]:
        results += _check_vae(bundle, manifest, wanted, args.batch, args.seed, bf16=precision == "bf16")
    _print(results)
    ran = [r for r in results if r.status != "not run"]
    failed = [r for r in ran if r.status != "ok"]
    skipped = sorted({f"{r.backend}: {r.note}" for r in results if r.status == "not run"})
    print(f"summary: {len(ran)} compared, {len(ran) - len(failed)} within tolerance, {len(failed)} outside"
          + (f"; not run: {'; '.join(skipped)}" if skipped else ""))
    report: Any = [asdict(r) for r in results]
    if precision == "bf16":
        from tstitch_trt.export import bf16_gate

        gate = bf16_gate.run_gate(bundle, manifest, results, getattr(args, "quality_images", 500), args.seed,
                                  record_it=getattr(args, "record", False))
        report = {"comparisons": report, "bf16": gate}
    if args.report:
        outputs = outputs or OutputPlan()
        if "--report" not in outputs.paths:
            outputs.add("--report", args.report)
        outputs.write({"--report": lambda p: Path(p).write_text(json.dumps(report, indent=2))})
    if not ran:
        print("nothing was compared: no backend of this bundle can run here, so nothing is verified")
        return 1
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------
def _openvino_installed() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):
        return False


def _check_models(bundle: Path, manifest: Manifest, wanted: list[str],
                  feeds: dict[str, np.ndarray], bf16: bool = False) -> list[Comparison]:
    import torch

    from tstitch_trt.export.torch_backend import iter_step_modules
    from tstitch_trt.runtime.io_roles import StepIO

    io = StepIO.from_io(manifest.io)  # the step graph's I/O by role: DiT (x, t, y, ...) or U-Net (x, t, context, ...)
    results = []
    # one model at a time: its torch reference output, then the model is dropped before any backend loads
    for model, step in zip(manifest.models, iter_step_modules(bundle, manifest), strict=True):
        names = list(io.outputs)
        cached_ref, cached_feeds = None, feeds
        with torch.inference_mode():
            tensors = {n: torch.from_numpy(feeds[n]) for n in io.inputs}
            if model.cached and manifest.cache:  # DeepCache / FORA: the full graph (+ the kept feature), the cached one
                from tstitch_trt.export.cache_steps import cache_names, cache_step_pair

                full, cached = cache_step_pair(step, manifest.cache, model.name)
                cache_in, cache_out = cache_names(manifest.cache)
                *ref_t, kept = full(**tensors)
                ref_t.append(kept)
                names.append(cache_out)
                out_c = cached(**tensors, **{cache_in: kept})
                cached_ref = {n: t.numpy() for n, t in zip(io.outputs, out_c, strict=True)}
                cached_feeds = {**feeds, cache_in: kept.numpy()}
            else:
                ref_t = step(**tensors)
        ref = {n: t.numpy() for n, t in zip(names, ref_t, strict=True)}
        del step, tensors
        gc.collect()  # the model's weights go before a backend loads its own copy (real sizes: GBs each)
        for backend in wanted:
            entry = model.engines.get(ARTIFACT.get(backend, backend))
            if entry is None:
                results.append(Comparison(model.name, backend, "-", "-", "not run", note="no artifact"))
                continue
            outs, why = _run(bundle, backend, entry, feeds, names)
            results += _judge(model.name, backend, entry, ref, outs, why)
            cached_entry = (model.cached or {}).get("engines", {}).get(ARTIFACT.get(backend, backend))
            if cached_ref is not None and cached_entry is not None:
                outs, why = _run(bundle, backend, cached_entry, cached_feeds, list(io.outputs))
                results += _judge(f"{model.name} (cached)", backend, cached_entry, cached_ref, outs, why)
        if bf16:
            from tstitch_trt.export.bf16_gate import run_bf16_step

            entry = model.engines["ort"]
            outs, why = run_bf16_step(artifact_path(bundle, entry), feeds, list(io.outputs))
            results += _judge(model.name, "openvino", entry, ref, outs, why, precision="bf16")
    return results


def _check_vae(bundle: Path, manifest: Manifest, wanted: list[str], batch: int, seed: int,
               bf16: bool = False) -> list[Comparison]:
    import torch
    from diffusers import AutoencoderKL

    assert manifest.vae is not None
    engines: dict[str, EngineEntry] = manifest.vae["engines"]
    torch_entry = engines["torch"]
    artifact_path(bundle, torch_entry)
    vae = AutoencoderKL.from_pretrained(str(bundle / torch_entry.extra["dir"]), low_cpu_mem_usage=False).eval()
    z = np.random.default_rng(seed + 1).standard_normal((batch, *manifest.latent_shape), dtype=np.float32)
    with torch.inference_mode():
        ref = {"image": vae.decode(torch.from_numpy(z)).sample.float().numpy()}
    del vae
    results = []
    for backend in wanted:
        if backend in engines:
            outs, why = _run(bundle, backend, engines[backend], {"latent": z}, ["image"])
            results += _judge("VAE decoder", backend, engines[backend], ref, outs, why)
    results += _check_openvino_part("VAE decoder", bundle, engines, {"latent": z}, ref, "openvino" in wanted, bf16)
    return results


def _check_openvino_part(label: str, bundle: Path, engines: dict[str, EngineEntry], feeds: dict[str, np.ndarray],
                         ref: dict[str, np.ndarray], fp32: bool, bf16: bool) -> list[Comparison]:
    """A text encoder / VAE decoder's ONNX graph on OpenVINO: fp32 where asked, and bf16 for its own verdict."""
    if "ort" not in engines:
        return []
    out: list[Comparison] = []
    path = artifact_path(bundle, engines["ort"])
    if fp32:
        from tstitch_trt.export.bf16_gate import run_openvino_step

        out += _judge(label, "openvino", engines["ort"], ref, run_openvino_step(path, feeds, list(ref), "fp32"), "")
    if bf16:
        from tstitch_trt.export.bf16_gate import run_bf16_step

        got, why = run_bf16_step(path, feeds, list(ref))
        out += _judge(label, "openvino", engines["ort"], ref, got, why, precision="bf16")
    return out


def _check_text_encoder(bundle: Path, manifest: Manifest, wanted: list[str], batch: int,
                        seed: int, bf16: bool = False) -> list[Comparison]:
    """The CLIP text encoder(s) on seeded token ids (BOS, random tokens, EOS padding) for 2 x batch prompts,
    against the torch encoder taking the hidden state the manifest names (SDXL: text_encoder_2's pooled
    text_embeds too)."""
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from tstitch_trt.export.unet_export import TextEncoder

    results = []
    for label, te in (("text encoder", manifest.text_encoder), ("text encoder 2", manifest.text_encoder_2)):
        if not te or "torch" not in te["engines"]:
            continue
        engines: dict[str, EngineEntry] = te["engines"]
        artifact_path(bundle, engines["torch"])
        cls = CLIPTextModelWithProjection if te.get("kind") == "CLIPTextModelWithProjection" else CLIPTextModel
        clip = cls.from_pretrained(str(bundle / engines["torch"].extra["dir"])).eval()
        enc = TextEncoder(clip, str(te.get("hidden_state", "last")), bool(te.get("pooled"))).eval()
        spec = te["io"]
        (in_name, in_spec), = spec["inputs"].items()
        out_names = list(spec["outputs"])
        length = int(in_spec["shape"][1])
        rng = np.random.default_rng(seed + 2)
        vocab = int(clip.config.vocab_size)
        ids = np.full((2 * batch, length), vocab - 1, dtype=np.int64)
        ids[:, 0] = vocab - 2
        ids[:, 1:12] = rng.integers(0, vocab - 2, size=(2 * batch, 11))
        with torch.inference_mode():
            out = enc(torch.from_numpy(ids))
        outs = out if isinstance(out, tuple) else (out,)
        ref = {n: o.float().numpy() for n, o in zip(out_names, outs, strict=True)}
        for backend in wanted:
            if backend in engines:
                got, why = _run(bundle, backend, engines[backend], {in_name: ids}, out_names)
                results += _judge(label, backend, engines[backend], ref, got, why)
        results += _check_openvino_part(label, bundle, engines, {in_name: ids}, ref, "openvino" in wanted, bf16)
    return results


def _judge(name: str, backend: str, entry: EngineEntry, ref: dict[str, np.ndarray],
           outs: dict[str, np.ndarray] | None, why: str, precision: str | None = None) -> list[Comparison]:
    precision = precision or (entry.precision if entry.precision in TOLERANCES else "fp32")
    if outs is None:
        return [Comparison(name, backend, "-", precision, "not run", note=why)]
    results = []
    for out_name, r in ref.items():
        m = compare(r, outs[out_name])
        status = "ok" if within(m, precision, out_name) else "FAIL"
        results.append(Comparison(name, backend, out_name, precision, status,
                                  tolerance=tolerance(precision, out_name), **m))
    return results


def _run(bundle: Path, backend: str, entry: EngineEntry, feeds: dict[str, np.ndarray],
         outputs: list[str]) -> tuple[dict[str, np.ndarray] | None, str]:
    """(outputs, "") or (None, why it could not run). Checksums are verified either way."""
    path = artifact_path(bundle, entry)
    batch = next(iter(feeds.values())).shape[0]
    if backend == "ort":
        from tstitch_trt.runtime.ort_backend import aux_session, maps_weights

        try:
            sess = aux_session(path, maps_weights(bundle, read_manifest(bundle)))
        except Exception as e:
            raise UserError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0]}; rebuild the bundle") from None
        return dict(zip(outputs, sess.run(outputs, feeds), strict=True)), ""
    if backend == "openvino":
        from tstitch_trt.export.bf16_gate import run_openvino_step

        return run_openvino_step(path, feeds, outputs, "fp32"), ""
    lo, hi = entry.batch_range
    if not lo <= batch <= hi:
        raise UserError(f"--batch {batch} is outside the {backend} engine's profile {lo}-{hi} ({entry.file})")
    from tstitch_trt.export.trt_build import cuda_gpu

    if cuda_gpu() is None:
        return None, "needs an NVIDIA GPU (plan checksum ok)"
    try:
        import torch

        if not torch.cuda.is_available():
            return None, "needs PyTorch with CUDA to feed the engine (plan checksum ok)"
    except ImportError:
        return None, "needs PyTorch with CUDA to feed the engine"
    return run_plan(backend, path, feeds, outputs), ""


def run_plan(kind: str, plan_path: Path, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
    """One synchronous launch of an engine plan on CUDA device 0 (torch tensors as device buffers)."""
    import torch

    from tstitch_trt.export.trt_build import capturing_logger
    from tstitch_trt.runtime.trt_backend import import_tensorrt

    if TYPE_CHECKING:
        import tensorrt as trt
    else:
        trt = import_tensorrt(kind)
    logger = capturing_logger(trt)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    if engine is None:
        raise UserError(f"{trt.__name__} cannot load {plan_path}: {logger.last_error()}; "
                        f"rebuild the bundle on this machine")
    context = engine.create_execution_context()
    buffers: dict[str, Any] = {}
    for name, value in feeds.items():
        buffers[name] = torch.from_numpy(np.ascontiguousarray(value)).cuda()
        context.set_input_shape(name, tuple(value.shape))
        context.set_tensor_address(name, buffers[name].data_ptr())
    for name in outputs:
        shape = tuple(context.get_tensor_shape(name))
        buffers[name] = torch.empty(shape, dtype=torch.float32, device="cuda")
        context.set_tensor_address(name, buffers[name].data_ptr())
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise UserError(f"{trt.__name__} failed to run {plan_path}: {logger.last_error()}")
    stream.synchronize()
    return {name: buffers[name].cpu().numpy() for name in outputs}


def _print(results: list[Comparison]) -> None:
    mw = max([14] + [len(r.model) for r in results])  # SD names are longer (eps_hist_next, text_embeddings)
    ow = max([7] + [len(r.output) for r in results])
    print(f"  {'model':{mw}s} {'backend':8s} {'output':{ow}s} {'prec':5s} {'max abs':>10s} {'max rel':>10s} "
          f"{'cosine':>10s}  result")
    for r in results:
        head = f"  {r.model:{mw}s} {r.backend:8s} {r.output:{ow}s} {r.precision:5s}"
        if r.status == "not run":
            print(f"{head} not run: {r.note}")
            continue
        tol = f"(rel <= {r.tolerance['max_rel']:g}, cos >= {r.tolerance['min_cos']:g})"
        print(f"{head} {r.max_abs:10.3g} {r.max_rel:10.3g} {r.cosine:10.7f}  {r.status} {tol}")
