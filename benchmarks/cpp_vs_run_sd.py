"""Summary of benchmarks/cpp_vs_run_sd.sh: per process wall / CPU / peak RSS of both sides, the C++ loop's host
overhead per step, and C's latents and image against Python's (the last repeat of each)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def time_v(path: Path) -> dict[str, float]:
    """Wall s, user + sys s and peak RSS GiB from a /usr/bin/time -v file."""
    text = path.read_text()
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text).group(1)
    secs = sum(float(p) * 60 ** i for i, p in enumerate(reversed(wall.split(":"))))
    cpu = sum(float(re.search(rf"{k} time \(seconds\): (\S+)", text).group(1)) for k in ("User", "System"))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) / 2**20
    return {"wall_s": secs, "cpu_s": cpu, "rss_gib": rss}


def main(work: Path, prec: str, repeats: int) -> None:
    rows = []
    for r in range(1, repeats + 1):
        c, py = time_v(work / f"c-{prec}-{r}.time"), time_v(work / f"py-{prec}-{r}.time")
        out = (work / f"c-{prec}-{r}.out").read_text()
        overhead = float(re.search(r"host overhead (\S+) ms/step", out).group(1))
        report = json.loads((work / f"py-{prec}-{r}.json").read_text())
        rows.append({"repeat": r, "c": c, "python": py, "c_host_overhead_ms_per_step": overhead,
                     "c_precision_line": out.splitlines()[0], "python_precisions": report.get("precisions")})
    ref = np.load(work / f"py-{prec}.npy")
    got = np.fromfile(work / f"c-{prec}.f32", dtype=np.float32).reshape(ref.shape)
    img = np.asarray(Image.open(work / f"py-{prec}.png").convert("RGB")).astype(int)
    rgb = np.fromfile(work / f"c-{prec}.u8", dtype=np.uint8).reshape(img.shape).astype(int)
    check = {"latents_max_rel": float(np.max(np.abs(got - ref)) / np.max(np.abs(ref))),
             "latents_bit_equal": bool(np.array_equal(got, ref)), "rgb_max_abs_diff": int(np.abs(rgb - img).max()),
             "latent_shape": list(ref.shape), "image_shape": list(img.shape)}
    summary = {"precision": prec, "runs": rows, "check": check}
    (work / f"summary-{prec}.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
