"""Real-size build, check and run of a stitched pair at its published architecture (random weights).

    python benchmarks/realsize.py --pair sd15 --work /tmp/realsize [--backend torch,ort] [--steps 4]

Each stage is its own process under /usr/bin/time -v (wall time, peak RSS, CPU %), in order:
  parts      models/real_configs writes the pair (sd15: BK-SDM-Tiny U-Net + SD 1.5 pipeline;
             sdxl: SSD-1B U-Net + SDXL pipeline) as diffusers directories
  build      tstitch-trt build --model SMALL --model LARGE --backend ...
  check      tstitch-trt check --backend ort,openvino --batch 1 (every backend vs the torch StepModule)
  run-ort / run-openvino   tstitch-trt run at the published size, --steps N --ratio R, PNDM, seeded
  diffusers  diffusers' own pipeline switched small -> large by callback (models/diffusers_peer.py)
and the final latents of each run are compared to diffusers' (max |a - b| / max |b|).
Results go to WORK/results.json and, as a Markdown table, to stdout (benchmarks/RESULTS.md quotes it).
Real sizes need real memory: run it alone, under `flock /work/bigmem.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

PAIRS = {"sd15": ("sd15-pair", "bk-sdm-tiny", "sd15", 512), "sdxl": ("sdxl-pair", "ssd-1b", "sdxl", 1024)}
CFG = {"sd15": "7.5", "sdxl": "5.0"}  # each pipeline's default guidance scale, given to both sides explicitly
PROMPT = "a photo of a cat sitting on a red chair"

REFERENCE = r'''
import sys, numpy as np, torch, diffusers
from diffusers import UNet2DConditionModel
from tstitch_trt.models.diffusers_peer import stitch_by_callback
from tstitch_trt.sampling.sd_samplers import sd_table
small, large, init, out, steps, ratio, size, prompt, kind, cfg = sys.argv[1:11]
steps, ratio, size, cfg = int(steps), float(ratio), int(size), float(cfg)
cls = diffusers.StableDiffusionXLPipeline if kind == "sdxl" else diffusers.StableDiffusionPipeline
extra = {} if kind == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
pipe = cls.from_pretrained(large, **extra)
pipe.scheduler = diffusers.PNDMScheduler.from_config(pipe.scheduler.config) if kind != "sdxl" else pipe.scheduler
pipe.set_progress_bar_config(disable=True)
small_unet = UNet2DConditionModel.from_pretrained(small).eval()
sampler = "pndm" if kind != "sdxl" else "euler"
n_calls = len(sd_table(sampler, dict(pipe.scheduler.config), steps).timesteps)
switch = stitch_by_callback(pipe, small_unet, pipe.unet, n_calls, ratio)
with torch.no_grad():
    lat = pipe([prompt], height=size, width=size, num_inference_steps=steps, guidance_scale=cfg,
               latents=torch.from_numpy(np.load(init)), output_type="latent", callback_on_step_end=switch).images
np.save(out, np.asarray(lat))
'''


def timed(name: str, cmd: list[str], log: Path) -> dict:
    """Run `cmd` under /usr/bin/time -v; its output goes to `log`; returns wall s, peak RSS GB, CPU %."""
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    with open(log, "w") as f:
        rc = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.STDOUT).returncode
    text = log.read_text(errors="replace")

    def field(label: str) -> str:
        m = re.search(rf"{re.escape(label)}: (.+)", text)
        return m.group(1).strip() if m else ""

    wall = field("Elapsed (wall clock) time (h:mm:ss or m:ss)")
    parts = [float(p) for p in wall.split(":")] if wall else [0.0]
    seconds = sum(v * 60**i for i, v in enumerate(reversed(parts)))
    rss = int(field("Maximum resident set size (kbytes)") or 0) / 2**20
    row = {"stage": name, "rc": rc, "wall_s": round(seconds, 1), "peak_rss_gb": round(rss, 2),
           "cpu": field("Percent of CPU this job got"), "command": " ".join(cmd), "log": str(log)}
    print(f"[{name}] rc {rc}, {seconds:.1f} s, peak RSS {rss:.2f} GB, CPU {row['cpu']}", flush=True)
    if rc != 0:
        print(text[-3000:], file=sys.stderr)
        # the command's last line before /usr/bin/time's report: a refusal's one line, or the error
        lines = [ln for ln in text.split("\tCommand being timed")[0].splitlines() if ln.strip()]
        row["error"] = lines[-1][:300] if lines else ""
    return row


def rel(a, b) -> float:
    import numpy as np

    return float(np.abs(a - b).max() / np.abs(b).max())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pair", choices=sorted(PAIRS), default="sd15")
    p.add_argument("--work", type=Path, required=True, help="folder for the parts, the bundle and the logs")
    p.add_argument("--backend", default="torch,ort", help="build backends (default torch,ort)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--stages", default="parts,build,check,run,diffusers",
                   help="comma list of parts, build, check, run, diffusers (default: all)")
    p.add_argument("--run-backends", default="ort,openvino", help="backends of the run stage (default ort,openvino)")
    p.add_argument("--check-backends", default="ort,openvino", help="backends of the check stage")
    args = p.parse_args(argv)
    import numpy as np

    writer, small_name, large_name, size = PAIRS[args.pair]
    work = args.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    parts, bundle, logs = work / "parts", work / "bundle", work / "logs"
    logs.mkdir(exist_ok=True)
    small, large = parts / small_name, parts / large_name
    stages = set(args.stages.split(","))
    results_path = work / "results.json"
    rows: list[dict] = json.loads(results_path.read_text())["rows"] if results_path.exists() else []
    py = sys.executable
    tst = [py, "-m", "tstitch_trt.cli"]

    def record(row: dict) -> dict:
        rows[:] = [r for r in rows if r["stage"] != row["stage"]] + [row]
        results_path.write_text(json.dumps({"pair": args.pair, "rows": rows}, indent=2))
        return row

    if "parts" in stages:
        record(timed("parts", [py, "-m", "tstitch_trt.models.real_configs", writer, str(parts)], logs / "parts.log"))
    if "build" in stages:
        record(timed("build", [*tst, "build", "--model", str(small), "--model", str(large), "--backend", args.backend,
                               "--batch-sizes", "1-1", "--out", str(bundle)], logs / "build.log"))
        du = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
        record({"stage": "bundle size", "bytes": du, "gb": round(du / 2**30, 2)})
    if "check" in stages:
        record(timed("check", [*tst, "check", "--bundle", str(bundle), "--backend", args.check_backends, "--batch", "1",
                               "--report", str(work / "check.json")], logs / "check.log"))
    lat = size // 8
    init = work / "init.npy"
    if not init.exists():
        np.save(init, np.random.default_rng(0).standard_normal((1, 4, lat, lat), dtype=np.float32))
    sampler = "euler" if args.pair == "sdxl" else "pndm"
    if "run" in stages:
        for backend in args.run_backends.split(","):
            record(timed(f"run-{backend}", [*tst, "run", "--bundle", str(bundle), "--backend", backend, "--prompt",
                                            PROMPT, "--sampler", sampler, "--steps", str(args.steps), "--ratio",
                                            str(args.ratio), "--cfg-scale", CFG[args.pair], "--init-noise",
                                            str(init), "--save-latents",
                                            str(work / f"lat-{backend}.npy"), "--report",
                                            str(work / f"run-{backend}.json"),
                                            "--out", str(work / f"{backend}.png")], logs / f"run-{backend}.log"))
    if "diffusers" in stages:
        script = work / "reference.py"
        script.write_text(REFERENCE)
        record(timed("diffusers", [py, str(script), str(small), str(large), str(init), str(work / "lat-diffusers.npy"),
                                   str(args.steps), str(args.ratio), str(size), PROMPT, args.pair, CFG[args.pair]],
                     logs / "diffusers.log"))
    ref_path = work / "lat-diffusers.npy"
    if ref_path.exists():
        ref = np.load(ref_path)
        for backend in ("ort", "openvino"):
            got = work / f"lat-{backend}.npy"
            if got.exists():
                record({"stage": f"{backend} vs diffusers", "max_rel": rel(np.load(got), ref)})
    print("\n| stage | wall s | peak RSS GB | CPU | result |\n|---|---|---|---|---|")
    for r in rows:
        result = r.get("max_rel", r.get("gb", f"rc {r.get('rc', '')}"))
        print(f"| {r['stage']} | {r.get('wall_s', '')} | {r.get('peak_rss_gb', '')} | {r.get('cpu', '')} | {result} |")
    return 0 if all(r.get("rc", 0) == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
