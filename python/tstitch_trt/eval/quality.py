"""FID / class accuracy / speed of stitched sampling across the stitch ratio (the T-Stitch trade-off curve).

For each ratio the same labels (balanced over the classes) and the same initial noise are
sampled, so differences between ratios come from the stitching, not from the draw. Generated
digits are scored by the bundle's classifier: accuracy against the requested labels, and a
Frechet distance between its penultimate features on the generated digits and on the 500
held-out real digits (an MNIST-scale FID; 500 samples make it biased upwards, so compare
ratios with each other and with the real-vs-real floor, not with ImageNet FIDs).

Command line: `tstitch-trt bench --quality --out DIR` (table, plot and JSON in DIR).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tstitch_trt.eval.frechet import feature_stats, frechet_distance
from tstitch_trt.eval.scorer import DigitScorer

DEFAULT_RATIOS = tuple(round(0.1 * i, 1) for i in range(11))


def quality_sweep(bundle_dir: str | Path, ratios: Sequence[float], images_per_point: int, backend: str = "auto",
                  steps: int = 50, cfg_scale: float = 1.5, seed: int = 0, batch: int = 100,
                  sampler: str = "ddim", progress: bool = False, precision: str = "auto",
                  cache_intervals: Sequence[int] = (1,)) -> dict:
    """Sample `images_per_point` digits at each (cache interval, ratio) and score them. cache_intervals: FORA's
    (`run --cache-interval`), on a bundle built with --cache-scheme fora; 1 = no caching. Every point draws the
    same labels and initial noise, so differences between points come from the stitching and the caching.

    Returns {"points": [{"ratio", "cache_interval", "fid", "accuracy", "seconds_per_image", "steps_per_model",
    "full_calls_per_model"}, ...], "reference": {"heldout_accuracy", "heldout_images", "fid_floor"}, and the
    settings}. seconds_per_image is the pipeline's wall time (loop + decode) divided by the images, batch `batch`.
    full_calls_per_model: the calls of each model that ran its full step graph (the run's report).
    """
    from tstitch_trt.bundle.manifest import read_manifest
    from tstitch_trt.pipeline.caching import check_dit_cache
    from tstitch_trt.pipeline.dit import StitchedPipeline

    if images_per_point < 2:
        raise ValueError("images_per_point must be >= 2 (a covariance needs two samples)")
    manifest = read_manifest(bundle_dir)
    intervals = [check_dit_cache(manifest, n) for n in cache_intervals]  # one line before any sampling
    scorer = DigitScorer(bundle_dir)
    ref_logits, ref_feats = scorer(scorer.heldout_images)
    ref_mu, ref_sigma = feature_stats(ref_feats)
    pipe = StitchedPipeline.from_bundle(bundle_dir, backend=backend, precision=precision)
    nc = pipe.manifest.num_classes
    labels = np.arange(images_per_point) % nc
    points = []
    try:
        for interval in intervals:
            for ratio in ratios:
                images, seconds, report = [], 0.0, {}
                for k, start in enumerate(range(0, images_per_point, batch)):
                    res = pipe(class_labels=labels[start:start + batch], ratio=float(ratio), steps=steps,
                               sampler=sampler, cfg_scale=cfg_scale, seed=seed + k, progress=False,
                               cache_interval=interval)
                    images.append(res.images)
                    seconds += res.report["total_seconds"]
                    report = res.report
                logits, feats = scorer(np.concatenate(images))
                mu, sigma = feature_stats(feats)
                point = {"ratio": float(ratio), "cache_interval": interval,
                         "fid": frechet_distance(mu, sigma, ref_mu, ref_sigma),
                         "accuracy": float((logits.argmax(1) == labels).mean()),
                         "seconds_per_image": seconds / images_per_point,
                         "steps_per_model": report["steps_per_model"],
                         "full_calls_per_model": full_calls_per_model(report)}
                points.append(point)
                if progress:
                    print(f"ratio {point['ratio']:.2f}{_interval_label(interval)}: FID {point['fid']:.2f}, accuracy "
                          f"{point['accuracy']:.3f}, {point['seconds_per_image'] * 1e3:.1f} ms/image",
                          file=sys.stderr, flush=True)
        backend_name, device = pipe.backend.name, pipe.backend.device
        precisions = getattr(pipe.backend, "precisions", None)
    finally:
        pipe.close()
    return {
        "bundle": str(bundle_dir),
        "models": pipe.model_names,
        "backend": backend_name,
        "device": device,
        "precision": precisions,
        "sampler": sampler,
        "steps": steps,
        "cfg_scale": cfg_scale,
        "seed": seed,
        "batch": batch,
        "cache_intervals": intervals,
        "images_per_point": images_per_point,
        "reference": {
            "heldout_images": int(len(scorer.heldout_labels)),
            "heldout_accuracy": float((ref_logits.argmax(1) == scorer.heldout_labels).mean()),
            "fid_floor": scorer.index.get("fid_floor"),  # real training digits vs held-out, same count
        },
        "points": points,
    }


def full_calls_per_model(report: dict) -> list[int]:
    """Calls of each model that ran its full step graph, from a run's report (every call without caching)."""
    full = [0] * len(report["steps_per_model"])
    cache = report.get("cache")
    calls = cache["full_calls"] if cache else range(len(report["step_model"]))
    for i in calls:
        full[report["step_model"][i]] += 1
    return full


def _cached(result: dict) -> bool:
    return any(p.get("cache_interval", 1) > 1 for p in result["points"])


def _interval_label(interval: int) -> str:
    return f", FORA interval {interval}" if interval > 1 else ""


def quality_table(result: dict) -> str:
    """The sweep as a Markdown table, with the reference numbers under it."""
    names, n_ref = result["models"], result["reference"]["heldout_images"]
    cached = _cached(result)  # FORA columns only where some point cached
    extra = "FORA interval | full calls | " if cached else ""
    lines = [
        f"| share of steps on {names[0]} | {extra}steps {names[0]} / {names[-1]} | FID (vs {n_ref} held-out) "
        "| class accuracy | ms / image |",
        "|---|---|---|---|---|" + ("---|---|" if cached else ""),
    ]
    for p in result["points"]:
        spm = p["steps_per_model"] or []
        fora = f"{p['cache_interval']} | {' / '.join(map(str, p['full_calls_per_model']))} | " if cached else ""
        lines.append(f"| {p['ratio']:.0%} | {fora}{' / '.join(map(str, spm))} | {p['fid']:.2f} | "
                     f"{p['accuracy']:.1%} | {p['seconds_per_image'] * 1e3:.1f} |")
    ref = result["reference"]
    note = (f"\n{result['images_per_point']} images per point, {result['sampler'].upper()} {result['steps']} steps, "
            f"cfg {result['cfg_scale']}, seed {result['seed']}, batch {result['batch']}, backend {result['backend']} "
            f"[{result['device']}]. Classifier accuracy on the held-out real digits: {ref['heldout_accuracy']:.1%}.")
    if ref.get("fid_floor") is not None:
        note += f" FID of {ref['heldout_images']} real training digits vs the held-out set: {ref['fid_floor']:.2f}."
    return "\n".join(lines) + "\n" + note + "\n"


def plot_quality(result: dict, path: str | Path) -> bool:
    """FID and ms/image vs ratio (left), accuracy vs ratio (right). False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    pts = result["points"]
    intervals = list(dict.fromkeys(p.get("cache_interval", 1) for p in pts))
    marks = dict(zip(intervals, "o^vsD<>", strict=False))  # one marker per FORA interval, one colour per metric

    def label(what: str, n: int) -> str:
        return what if intervals == [1] else f"{what}, interval {n}"

    fig, (ax, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_t = ax.twinx()
    for n in intervals:
        group = [p for p in pts if p.get("cache_interval", 1) == n]
        r = [p["ratio"] for p in group]
        ax.plot(r, [p["fid"] for p in group], f"{marks[n]}-", color="tab:blue", label=label("FID", n))
        ax_t.plot(r, [p["seconds_per_image"] * 1e3 for p in group], f"{marks[n]}--", color="tab:orange",
                  label=label("ms / image", n))
        ax_acc.plot(r, [100 * p["accuracy"] for p in group], f"{marks[n]}-", color="tab:green",
                    label=label("generated", n))
    ax.set_xlabel(f"share of steps on the small model ({result['models'][0]})")
    ax.set_ylabel("FID vs held-out digits (lower is better)", color="tab:blue")
    floor = result["reference"].get("fid_floor")
    if floor is not None:
        ax.axhline(floor, color="tab:blue", ls=":", lw=1, label="FID real vs real")
    ax_t.set_ylabel(f"ms / image ({result['backend']}, {result['device']})", color="tab:orange")
    # headroom above both curves for one legend of all the lines
    ax.set_ylim(0, 1.35 * max(p["fid"] for p in pts))
    ax_t.set_ylim(0, 1.35 * max(p["seconds_per_image"] * 1e3 for p in pts))
    handles = ax.get_legend_handles_labels()[0] + ax_t.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper center", ncol=3, fontsize="small")
    ax_acc.axhline(100 * result["reference"]["heldout_accuracy"], color="tab:green", ls=":", lw=1,
                   label="held-out real digits")
    ax_acc.set_xlabel("share of steps on the small model")
    ax_acc.set_ylabel("class accuracy (%)")
    ax_acc.legend(loc="lower left")
    fig.suptitle(f"T-Stitch {' -> '.join(result['models'])}: {result['images_per_point']} digits per point, "
                 f"{result['sampler'].upper()} {result['steps']}, cfg {result['cfg_scale']}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_quality_report(result: dict, markdown_path: str | Path | None = None,
                         png_path: str | Path | None = None, json_path: str | Path | None = None) -> list[Path]:
    """Write the table (Markdown), the plot (PNG, if matplotlib is importable) and the raw JSON."""
    written = []
    if markdown_path:
        Path(markdown_path).write_text(quality_table(result))
        written.append(Path(markdown_path))
    if png_path and plot_quality(result, png_path):
        written.append(Path(png_path))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
        written.append(Path(json_path))
    return written
