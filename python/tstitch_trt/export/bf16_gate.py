"""The bf16 gate: does bf16 inference keep a bundle's quality? (`tstitch-trt check --precision bf16`)

Per model, one step in OpenVINO bf16 (network in bf16, fp32 I/O) against the fp32 torch StepModule
on check.py's inputs, within BF16_STEP_TOLERANCE. For a bundle with the demo evaluator
(eval/eval.json) also whole trajectories: FID and class accuracy at ratio 0 and 0.4 (the same
labels, initial noise and seeds) in fp32 and in bf16 on OpenVINO; bf16 passes when its FID is within
3% and its accuracy within 1 point of fp32 at both ratios. A model is bf16-safe when every check
that applies passes.

Step tolerance, from measurement on check's inputs (batch 2, seed 0, t=591, cfg 4; OpenVINO 2026.4,
AMD EPYC Zen 4). x_next, the state the trajectory carries, gets the tight bound: the trained demo
pair gives max rel 1.06% / 1.05% (cosine 0.99997), random-weight tiny DiTs 6.8% / 3.7% (cosine
0.9984 / 0.9992). x0 gets a sanity bound only: at this t it is (x - 3.4 eps) / 0.29, and CFG 4 scales
the eps difference by 4, so bf16's eps error shows ~17x larger in x0 (demo pair 19% / 17%, cosine
0.993 / 0.992) although x0 enters the next state only through the update (x_next above); it still
catches garbage (overflow, a wrong graph). Whole-trajectory quality is the evaluator's job.

`--record` writes the verdict into manifest.json as models[i].bf16 = {"safe", "reason",
"step_max_rel", "step_min_cosine" (x_next's), "checked_with", "isa"}; only manifest.json changes (replaced
atomically), so every artifact and its recorded checksum stay as they were. "isa" lists the CPU bf16
ISAs the verdict was measured on (runtime/cpu_isa.py: amx_bf16, avx512_bf16): OpenVINO runs other
kernels on AMX, so `--precision auto` uses bf16 only on an ISA the verdict lists. Recording a safe
verdict over a safe one measured on another ISA keeps both ISAs (worst figures of the two); any other
recording replaces the verdict.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from tstitch_trt.bundle.manifest import Manifest
from tstitch_trt.errors import UserError

BF16_STEP_TOLERANCE = {"x_next": {"max_rel": 2e-2, "min_cos": 0.9995}, "x0": {"max_rel": 0.5, "min_cos": 0.98},
                       # text-to-image bundles' text encoder(s) and VAE decoder, each its own verdict (see below)
                       "text_embeddings": {"max_rel": 5e-2, "min_cos": 0.999},
                       "text_embeds": {"max_rel": 5e-2, "min_cos": 0.999},
                       "image": {"max_rel": 5e-2, "min_cos": 0.999}}
# the verdicts of the parts outside the stitched loop, by check's label -> manifest key
AUX_KEYS = {"text encoder": "text_encoder", "text encoder 2": "text_encoder_2", "VAE decoder": "vae"}
QUALITY_RATIOS = (0.0, 0.4)
MAX_FID_INCREASE = 0.03  # relative to fp32
MAX_ACCURACY_DROP = 0.01  # absolute (1 point)


def run_openvino_step(path: Path, feeds: dict[str, np.ndarray], outputs: list[str],
                      precision: str) -> dict[str, np.ndarray]:
    """One step of the ONNX graph at `path` in OpenVINO (CPU) at `precision`."""
    from tstitch_trt.runtime.openvino_backend import compile_static, import_openvino

    ov = import_openvino()
    core = ov.Core()
    shapes = {n: tuple(a.shape) for n, a in feeds.items()}  # the feeds fix every dim (B, 2B, H, W)
    compiled = compile_static(core, core.read_model(str(path)), shapes, precision)
    res = compiled(feeds)
    return {n: np.array(res[n]) for n in outputs}


def native_bf16() -> bool:
    from tstitch_trt.runtime.openvino_backend import cpu_has_bf16, import_openvino

    return cpu_has_bf16(import_openvino().Core())


def run_bf16_step(path: Path, feeds: dict[str, np.ndarray],
                  outputs: list[str]) -> tuple[dict[str, np.ndarray] | None, str]:
    if not native_bf16():
        return None, "this CPU has no native bf16 (AVX512_BF16 / AMX)"
    return run_openvino_step(path, feeds, outputs, "bf16"), ""


def quality_gate(bundle: Path, images: int, seed: int) -> dict:
    """FID / accuracy at QUALITY_RATIOS in fp32 and bf16 on OpenVINO, and whether bf16 passes."""
    from tstitch_trt.eval.quality import quality_sweep

    runs = {p: quality_sweep(bundle, QUALITY_RATIOS, images, backend="openvino", seed=seed, precision=p)
            for p in ("fp32", "bf16")}
    points = []
    for f, b in zip(runs["fp32"]["points"], runs["bf16"]["points"], strict=True):
        fid_change = (b["fid"] - f["fid"]) / f["fid"]
        acc_change = b["accuracy"] - f["accuracy"]
        points.append({"ratio": f["ratio"], "fid_fp32": f["fid"], "fid_bf16": b["fid"],
                       "fid_change": fid_change, "accuracy_fp32": f["accuracy"], "accuracy_bf16": b["accuracy"],
                       "accuracy_change": acc_change,
                       "pass": fid_change <= MAX_FID_INCREASE and acc_change >= -MAX_ACCURACY_DROP})
    summary = "; ".join(f"ratio {p['ratio']:g}: FID {p['fid_fp32']:.2f} -> {p['fid_bf16']:.2f} "
                        f"({100 * p['fid_change']:+.1f}%), accuracy {100 * p['accuracy_fp32']:.1f}% -> "
                        f"{100 * p['accuracy_bf16']:.1f}%" for p in points)
    return {"images_per_point": images, "points": points, "pass": all(p["pass"] for p in points),
            "summary": f"{summary} ({images} images)"}


def verdicts(manifest: Manifest, results: list, quality: dict | None, checked_with: str,
             isa: str | None = None) -> dict[str, dict]:
    """{model name: the models[i].bf16 record} from check's bf16 comparisons and the quality gate."""
    out: dict[str, dict] = {}
    for name in [m.name for m in manifest.models] + list(AUX_KEYS):
        rows = [r for r in results if r.model == name and r.precision == "bf16" and r.status != "not run"]
        if not rows:
            continue
        state = [r for r in rows if r.output == "x_next"] or rows  # a step graph: x_next, the state it carries
        max_rel = max(r.max_rel for r in state)
        min_cos = min(r.cosine for r in state)
        step_ok = all(r.status == "ok" for r in rows)
        per_output = ", ".join(f"{r.output} max rel {r.max_rel:.2g} cosine {r.cosine:.6f} "
                               f"({'ok' if r.status == 'ok' else 'OUTSIDE'} rel <= {r.tolerance['max_rel']:g}, "
                               f"cos >= {r.tolerance['min_cos']:g})" for r in rows)
        what = "one step" if name not in AUX_KEYS else "one call"
        reasons = [f"{what} vs torch fp32: {per_output}"]
        safe = step_ok
        if quality is not None and name not in AUX_KEYS:
            safe = safe and quality["pass"]
            limits = f"FID +{100 * MAX_FID_INCREASE:g}%, accuracy -{100 * MAX_ACCURACY_DROP:g} pt"
            verdict = "within" if quality["pass"] else "OUTSIDE"
            reasons.append(f"demo evaluator, bf16 vs fp32 {verdict} {limits}: {quality['summary']}")
        out[name] = {"safe": bool(safe), "reason": "; ".join(reasons), "step_max_rel": float(max_rel),
                     "step_min_cosine": float(min_cos), "checked_with": checked_with}
        if isa is not None:
            out[name]["isa"] = [isa]
            out[name]["reason"] = f"on {isa}: {out[name]['reason']}"
    return out


def merge_verdict(old: dict | None, new: dict) -> dict:
    """`new` (measured on one ISA) recorded over `old`: both safe on other ISAs -> one verdict covering both."""
    from tstitch_trt.runtime.cpu_isa import BF16_ISAS

    if not (old and old.get("safe") and new["safe"] and old.get("isa")) or set(new["isa"]) <= set(old["isa"]):
        return new
    isas = [i for i in BF16_ISAS if i in set(old["isa"]) | set(new["isa"])]
    reason = f"{new['reason']} | {old.get('reason', '')}"[:4000]
    return {**new, "isa": isas, "reason": reason,
            "step_max_rel": max(new["step_max_rel"], old.get("step_max_rel", 0.0)),
            "step_min_cosine": min(new["step_min_cosine"], old.get("step_min_cosine", 1.0))}


def record(bundle: Path, records: dict[str, dict]) -> None:
    """Write models[i].bf16 into manifest.json (atomic replace; nothing else in the bundle changes)."""
    path = bundle / "manifest.json"
    raw = json.loads(path.read_text())
    for m in raw["models"]:
        if m["name"] in records:
            m["bf16"] = merge_verdict(m.get("bf16"), records[m["name"]])
    for label, key in AUX_KEYS.items():  # text encoder(s), VAE decoder: each its own verdict
        if label in records and raw.get(key):
            raw[key]["bf16"] = merge_verdict(raw[key].get("bf16"), records[label])
    tmp = path.with_name(f".manifest.json.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(raw, indent=2))  # as Manifest.to_json writes it
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot record the bf16 verdict in {path} ({e.strerror}); copy the bundle somewhere "
                        "writable, or run without --record") from None


def run_gate(bundle: Path, manifest: Manifest, results: list, quality_images: int, seed: int,
             record_it: bool) -> dict[str, Any]:
    """The verdict per model (printed; recorded with record_it); returns it for check's JSON report."""
    import openvino

    from tstitch_trt.runtime.cpu_isa import bf16_isa

    if not any(r.precision == "bf16" and r.status != "not run" for r in results):
        note = next((r.note for r in results if r.precision == "bf16"), "bf16 was not run")
        print(f"bf16: no verdict: {note}")
        if record_it:
            raise UserError(f"nothing to record: bf16 could not be measured here ({note})")
        return {"verdicts": {}, "quality": None, "note": note}
    isa = bf16_isa()
    if isa is None and record_it:
        raise UserError("nothing recorded: this CPU's bf16 ISA (amx_bf16 / avx512_bf16) cannot be told from "
                        "/proc/cpuinfo, and a verdict must name it; run without --record")
    quality = None
    if (bundle / "eval" / "eval.json").is_file() and quality_images > 0:
        if quality_images < 2:
            raise UserError(f"--quality-images must be >= 2 (or 0 to skip), got {quality_images}")
        print(f"bf16 quality gate: {quality_images} images at ratios "
              f"{', '.join(f'{r:g}' for r in QUALITY_RATIOS)}, fp32 and bf16 on OpenVINO ...", flush=True)
        quality = quality_gate(bundle, quality_images, seed)
    records = verdicts(manifest, results, quality, f"openvino {openvino.__version__}", isa)
    for name, v in records.items():
        print(f"bf16 {name}: {'safe' if v['safe'] else 'NOT safe'}: {v['reason']}")
    if record_it:
        record(bundle, records)
        print(f"recorded the bf16 verdict in {bundle / 'manifest.json'}")
    return {"verdicts": records, "quality": quality}
