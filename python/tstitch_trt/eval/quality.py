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
                  cache_interval: int = 1) -> dict:
    """Sample `images_per_point` digits at each ratio and score them (cache_interval: FORA's, on a bundle built
    with --cache-scheme fora; 1 = no caching).

    Returns {"points": [{"ratio", "fid", "accuracy", "seconds_per_image", "steps_per_model"}, ...],
    "reference": {"heldout_accuracy", "heldout_images", "fid_floor"}, and the settings}.
    seconds_per_image is the pipeline's wall time (loop + decode) divided by the images, batch `batch`.
    """
    from tstitch_trt.pipeline.dit import StitchedPipeline

    if images_per_point < 2:
        raise ValueError("images_per_point must be >= 2 (a covariance needs two samples)")
    scorer = DigitScorer(bundle_dir)
    ref_logits, ref_feats = scorer(scorer.heldout_images)
    ref_mu, ref_sigma = feature_stats(ref_feats)
    pipe = StitchedPipeline.from_bundle(bundle_dir, backend=backend, precision=precision)
    nc = pipe.manifest.num_classes
    labels = np.arange(images_per_point) % nc
    points = []
    try:
        for ratio in ratios:
            images, seconds, per_model = [], 0.0, None
            for k, start in enumerate(range(0, images_per_point, batch)):
                res = pipe(class_labels=labels[start:start + batch], ratio=float(ratio), steps=steps,
                           sampler=sampler, cfg_scale=cfg_scale, seed=seed + k, progress=False,
                           cache_interval=cache_interval)
                images.append(res.images)
                seconds += res.report["total_seconds"]
                per_model = res.report["steps_per_model"]
            logits, feats = scorer(np.concatenate(images))
            mu, sigma = feature_stats(feats)
            point = {"ratio": float(ratio), "fid": frechet_distance(mu, sigma, ref_mu, ref_sigma),
                     "accuracy": float((logits.argmax(1) == labels).mean()),
                     "seconds_per_image": seconds / images_per_point, "steps_per_model": per_model}
            points.append(point)
            if progress:
                print(f"ratio {point['ratio']:.2f}: FID {point['fid']:.2f}, accuracy {point['accuracy']:.3f}, "
                      f"{point['seconds_per_image'] * 1e3:.1f} ms/image", file=sys.stderr, flush=True)
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
        "cache_interval": cache_interval,
        "images_per_point": images_per_point,
        "reference": {
            "heldout_images": int(len(scorer.heldout_labels)),
            "heldout_accuracy": float((ref_logits.argmax(1) == scorer.heldout_labels).mean()),
            "fid_floor": scorer.index.get("fid_floor"),  # real training digits vs held-out, same count
        },
        "points": points,
    }


def quality_table(result: dict) -> str:
    """The sweep as a Markdown table, with the reference numbers under it."""
    names, n_ref = result["models"], result["reference"]["heldout_images"]
    lines = [
        f"| share of steps on {names[0]} | steps {names[0]} / {names[-1]} | FID (vs {n_ref} held-out) "
        "| class accuracy | ms / image |",
        "|---|---|---|---|---|",
    ]
    for p in result["points"]:
        spm = p["steps_per_model"] or []
        lines.append(f"| {p['ratio']:.0%} | {' / '.join(map(str, spm))} | {p['fid']:.2f} | {p['accuracy']:.1%} | "
                     f"{p['seconds_per_image'] * 1e3:.1f} |")
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
    r = [p["ratio"] for p in pts]
    fig, (ax, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    fid = [p["fid"] for p in pts]
    ms = [p["seconds_per_image"] * 1e3 for p in pts]
    ax.plot(r, fid, "o-", color="tab:blue", label="FID")
    ax.set_xlabel(f"share of steps on the small model ({result['models'][0]})")
    ax.set_ylabel("FID vs held-out digits (lower is better)", color="tab:blue")
    floor = result["reference"].get("fid_floor")
    if floor is not None:
        ax.axhline(floor, color="tab:blue", ls=":", lw=1, label="FID real vs real")
    ax_t = ax.twinx()
    ax_t.plot(r, ms, "s--", color="tab:orange", label="ms / image")
    ax_t.set_ylabel(f"ms / image ({result['backend']}, {result['device']})", color="tab:orange")
    # headroom above both curves for one legend of all three lines
    ax.set_ylim(0, 1.35 * max(fid))
    ax_t.set_ylim(0, 1.35 * max(ms))
    handles = ax.get_legend_handles_labels()[0] + ax_t.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper center", ncol=3, fontsize="small")
    ax_acc.plot(r, [100 * p["accuracy"] for p in pts], "o-", color="tab:green", label="generated")
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
