"""The README's FORA x T-Stitch figure from the measured JSON (benchmarks/fora_quality.py's output):

    python benchmarks/plot_fora.py   # -> docs/fora_quality.png

FID and class accuracy (500 images per point: results-fora-demo-500.json) against the CPU time per image relative
to the large model alone without caching (the timing rounds: results-fora-demo-100.json), one line per stitch
ratio through FORA intervals 1, 2, 3.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).parent


def load(quality: Path, timing: Path) -> list[dict]:
    """The quality points with `rel_cpu` (CPU ms per image / that of ratio 0, interval 1) from the timing run."""
    q, t = json.loads(quality.read_text()), json.loads(timing.read_text())
    cpu = {(p["ratio"], p["cache_interval"]): p["cpu_ms_per_image_median"] for p in t["points"]}
    base = cpu[(0.0, 1)]
    return [{**p, "rel_cpu": cpu[(p["ratio"], p["cache_interval"])] / base, "base_cpu_ms": base}
            for p in q["points"]]


def plot(points: list[dict], out: Path, images: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ratio, color in ((0.0, "tab:blue"), (0.4, "tab:red")):
        pts = sorted((p for p in points if p["ratio"] == ratio), key=lambda p: p["cache_interval"])
        label = "large model alone" if ratio == 0 else f"T-Stitch ratio {ratio}"
        x = [p["rel_cpu"] for p in pts]
        ax.plot(x, [p["fid"] for p in pts], "o-", color=color, label=label)
        ax_acc.plot(x, [100 * p["accuracy"] for p in pts], "o-", color=color, label=label)
        for p in pts:
            ax.annotate(f"interval {p['cache_interval']}", (p["rel_cpu"], p["fid"]), textcoords="offset points",
                        xytext=(4, 6), fontsize="small", color=color)
    ax.set_xlabel(f"CPU time per image (1 = large model, no caching: {points[0]['base_cpu_ms']:.0f} ms)")
    ax.set_ylabel("FID vs held-out digits (lower is better)")
    ax.set_xlim(0, 1.1)
    fids = [p["fid"] for p in points]
    ax.set_ylim(min(fids) - 0.3, max(fids) + 0.5)  # room for the labels
    ax.legend(loc="upper right", fontsize="small")
    ax_acc.set_xlabel("CPU time per image (relative)")
    ax_acc.set_ylabel("class accuracy (%)")
    ax_acc.set_xlim(0, 1.1)
    ax_acc.legend(loc="lower right", fontsize="small")
    fig.suptitle(f"FORA feature caching x T-Stitch, demo pair: {images} digits per point, DDIM 50, cfg 1.5, "
                 "ORT on 2 CPU cores")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quality", default=str(HERE / "results-fora-demo-500.json"))
    p.add_argument("--timing", default=str(HERE / "results-fora-demo-100.json"))
    p.add_argument("--out", default=str(HERE.parent / "docs" / "fora_quality.png"))
    args = p.parse_args()
    points = load(Path(args.quality), Path(args.timing))
    plot(points, Path(args.out), json.loads(Path(args.quality).read_text())["images_per_point"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
