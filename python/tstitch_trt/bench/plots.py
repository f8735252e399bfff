"""PNG plots of the ratio sweep and the end-to-end times (--plot; matplotlib)."""

from __future__ import annotations

import os
from pathlib import Path

from tstitch_trt.errors import UserError


def write_plots(result: dict, out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install matplotlib (or the dev extra)") from None
    written = []
    sweeps = {n: e["ratio_sweep"] for n, e in result["backends"].items()
              if e.get("ratio_sweep", {}) and e["ratio_sweep"].get("status") == "ok"}
    if sweeps:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, (name, sw) in enumerate(sweeps.items()):
            r = [p["ratio"] for p in sw["points"]]
            color = f"C{i}"
            ax.plot(r, [p["seconds"]["min"] for p in sw["points"]], "o-", color=color, label=f"{name} measured (min)")
            ax.plot(r, [p["ideal_seconds"]["min"] for p in sw["points"]], "--", color=color, alpha=0.6,
                    label=f"{name} ideal line")
        ax.set_xlabel("ratio (share of steps on the small model)")
        ax.set_ylabel("seconds per trajectory")
        ax.set_title(f"{result['workload']['name']}: time against ratio")
        ax.legend()
        fig.tight_layout()
        written.append(_save(fig, out / "ratio_sweep.png"))
        plt.close(fig)
    bars = []
    ref = result.get("reference") or {}
    if ref.get("e2e"):
        bars.append(("reference", ref["e2e"]["seconds"]))
    bars += [(n, e["e2e"]["seconds"]) for n, e in result["backends"].items() if e.get("e2e")]
    if bars:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.bar([b[0] for b in bars], [b[1]["median"] for b in bars], color="#999", label="median")
        ax.bar([b[0] for b in bars], [b[1]["min"] for b in bars], color="#36c", width=0.5, label="min")
        ax.set_ylabel("seconds per trajectory")
        ax.set_title("end to end")
        ax.legend()
        fig.tight_layout()
        written.append(_save(fig, out / "e2e.png"))
        plt.close(fig)
    return written


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    return path
