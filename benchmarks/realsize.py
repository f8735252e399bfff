"""Real-size build, check and run of a stitched pair at its published architecture (random weights).

    python benchmarks/realsize.py --pair sd15 --work /tmp/realsize [--backend torch,ort] [--steps 4]
    python benchmarks/realsize.py --pair sd15-small --work W --parts-from /work/scratch/sd15/parts

Pairs (PAIRS): sd15 (BK-SDM-Tiny -> SD 1.5), sd15-small (BK-SDM-Small -> SD 1.5), sd15-controlnet (an SD 1.5
U-Net -> SD 1.5 with the SD 1.5 ControlNet and a control image; BK-SDM cannot take that ControlNet), sdxl
(SSD-1B -> SDXL base), sdxl-lcm (T-Stitch's LCM setup: SSD-1B with the LCM-LoRA for SSD-1B fused -> LCM-SDXL,
LCMScheduler, guidance 0), dit (DiT-S/2 -> DiT-XL/2 at 256 px, class-conditional, the SD VAE).
Each stage is its own process under /usr/bin/time -v (wall time, peak RSS, CPU %), in order:
  parts      models/real_configs writes the pair's parts as diffusers directories / official checkpoints
             (--parts-from DIR: a part already under DIR is used from there, read only, not written)
  build      tstitch-trt build --model SMALL --model LARGE --backend ... [--controlnet CN] [--lora small=FILE]
             [--build-args ...]
  check      tstitch-trt check --backend ort,openvino --batch 1 (every backend vs the torch StepModule)
  run-ort / run-openvino   tstitch-trt run at the published size, --steps N --ratio R, seeded
             (SD: PNDM / SDXL: Euler from init.npy; DiT: DDIM, class labels, --seed 0; sdxl-lcm: LCM through
             the Python API, which takes the per-step noise (the CLI draws its own), drawn as diffusers draws it;
             latents only: the SDXL VAE's decode is the sdxl pair's)
  diffusers  SD: diffusers' own pipeline switched small -> large by callback (models/diffusers_peer.py);
             DiT (no diffusers peer for a stitched DiT): `run --backend torch`, the bundle's torch StepModules
  cache      (not by default) ORT runs at each --cache-intervals value, --repeats times: min / median sampling time
and the final latents of each run are compared to the reference (max |a - b| / max |b|).
Results go to WORK/results.json and, as a Markdown table, to stdout (benchmarks/RESULTS.md quotes it).
Real sizes need real memory: run it alone, under `flock /work/bigmem.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pair:
    writers: tuple[tuple[str, str], ...]  # (models/real_configs part, where under parts/: "" = parts/ itself)
    small: str  # under parts/
    large: str
    size: int  # pixels
    kind: str  # sd15, sdxl or dit
    controlnet: str | None = None  # under parts/
    lora: str | None = None  # under parts/: fused into the small model at build (--lora small=FILE)
    sampler: str | None = None  # default SAMPLER[kind]
    cfg: str | None = None  # default CFG[kind]


PAIRS = {
    "sd15": Pair((("sd15-pair", ""),), "bk-sdm-tiny", "sd15", 512, "sd15"),
    "sd15-small": Pair((("bk-sdm-small", "bk-sdm-small"), ("sd15-pipeline", "sd15")), "bk-sdm-small", "sd15", 512,
                       "sd15"),
    "sd15-controlnet": Pair((("sd15-unet", "sd15-unet"), ("sd15-pipeline", "sd15"), ("sd15-controlnet", "controlnet")),
                            "sd15-unet", "sd15", 512, "sd15", controlnet="controlnet"),
    "sdxl": Pair((("sdxl-pair", ""),), "ssd-1b", "sdxl", 1024, "sdxl"),
    # REFERENCE.md: "LCM: large lcm-sdxl UNet, small SSD-1B with lcm-lora-ssd-1b fused; 2/4/8 steps, g = 0"
    "sdxl-lcm": Pair((("ssd-1b", "ssd-1b"), ("lcm-sdxl-pipeline", "lcm-sdxl"), ("lcm-lora-ssd-1b", "lcm-lora-ssd-1b")),
                     "ssd-1b", "lcm-sdxl", 1024, "sdxl", lora="lcm-lora-ssd-1b/pytorch_lora_weights.safetensors",
                     sampler="lcm", cfg="0.0"),
    "dit": Pair((("dit-pair", ""),), "DiT-S-2.safetensors", "DiT-XL-2.safetensors", 256, "dit"),
}
CFG = {"sd15": "7.5", "sdxl": "5.0", "dit": "1.5"}  # each pipeline's default guidance scale, given explicitly
PROMPT = "a photo of a cat sitting on a red chair"
LABELS = "207"  # DiT: one ImageNet class (golden retriever), batch 1 as the SD runs
SAMPLER = {"sd15": "pndm", "sdxl": "euler", "dit": "ddim"}

# sdxl-lcm: ours through the Python API, with the start latent and per-step noise diffusers draws (LCM adds noise
# after every call but the last; the CLI would draw its own)
RUN_LCM = r'''
import json, sys, numpy as np
from tstitch_trt.pipeline.sd import StitchedSDPipeline
bundle, backend, init, noise, out, report, steps, ratio, cfg, prompt = sys.argv[1:11]
pipe = StitchedSDPipeline.from_bundle(bundle, backend=backend)
try:
    res = pipe(prompt, sampler="lcm", ratio=float(ratio), steps=int(steps), cfg_scale=float(cfg),
               init_noise=np.load(init), step_noise=np.load(noise), decode=False)
finally:
    pipe.close()
np.save(out, res.latents)
open(report, "w").write(json.dumps(res.report, indent=2, default=str))
print(json.dumps(res.report, default=str))
'''

# sdxl-lcm's peer, as tests/test_lcm_sdxl.py: StableDiffusionXLPipeline of the LCM-SDXL directory with
# LCMScheduler, the small U-Net fused by diffusers (load_lora_weights + fuse_lora) and presented with the large
# one's guidance embedding (EmbeddingBlind), switched by callback; start latent and noise from one generator
REFERENCE_LCM = r'''
import sys, numpy as np, torch
from diffusers import LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from tstitch_trt.models.diffusers_peer import EmbeddingBlind, stitch_by_callback
small, large, lora, out, steps, ratio, size, prompt, cfg, seed = sys.argv[1:11]
steps, ratio, size, cfg, seed = int(steps), float(ratio), int(size), float(cfg), int(seed)
pipe = StableDiffusionXLPipeline.from_pretrained(large)
pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
big = pipe.unet
pipe.unet = UNet2DConditionModel.from_pretrained(small).eval()
pipe.load_lora_weights(lora)
pipe.fuse_lora(components=["unet"])
pipe.unload_lora_weights()
switch = stitch_by_callback(pipe, EmbeddingBlind(pipe.unet, big.config.time_cond_proj_dim), big, steps, ratio)
with torch.no_grad():
    lat = pipe([prompt], height=size, width=size, num_inference_steps=steps, guidance_scale=cfg,
               generator=torch.Generator().manual_seed(seed), output_type="latent",
               callback_on_step_end=switch).images
np.save(out, lat.numpy())
'''

REFERENCE = r'''
import sys, numpy as np, torch, diffusers
from diffusers import UNet2DConditionModel
from tstitch_trt.models.diffusers_peer import stitch_by_callback
from tstitch_trt.sampling.sd_samplers import sd_table
small, large, init, out, steps, ratio, size, prompt, kind, cfg, control = sys.argv[1:12]
steps, ratio, size, cfg = int(steps), float(ratio), int(size), float(cfg)
cls = diffusers.StableDiffusionXLPipeline if kind == "sdxl" else diffusers.StableDiffusionPipeline
extra = {} if kind == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
pipe = cls.from_pretrained(large, **extra)
control_args = {}
if control != "-":  # CONTROLNET_DIR:IMAGE: the same ControlNet feeds both U-Nets (tests/test_controlnet.py's peer)
    from PIL import Image
    net_dir, image = control.split(":", 1)
    parts = {k: v for k, v in pipe.components.items() if k not in ("safety_checker", "feature_extractor",
                                                                    "image_encoder")}
    pipe = diffusers.StableDiffusionControlNetPipeline(
        **parts, controlnet=diffusers.ControlNetModel.from_pretrained(net_dir).eval(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    control_args = {"image": Image.open(image)}
pipe.scheduler = diffusers.PNDMScheduler.from_config(pipe.scheduler.config) if kind != "sdxl" else pipe.scheduler
pipe.set_progress_bar_config(disable=True)
small_unet = UNet2DConditionModel.from_pretrained(small).eval()
sampler = "pndm" if kind != "sdxl" else "euler"
n_calls = len(sd_table(sampler, dict(pipe.scheduler.config), steps).timesteps)
switch = stitch_by_callback(pipe, small_unet, pipe.unet, n_calls, ratio)
with torch.no_grad():
    lat = pipe([prompt], height=size, width=size, num_inference_steps=steps, guidance_scale=cfg,
               latents=torch.from_numpy(np.load(init)), output_type="latent", callback_on_step_end=switch,
               **control_args).images
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


def control_png(path: Path, size: int) -> Path:
    """A seeded random RGB control image of the output's size (what tests/test_controlnet.py feeds)."""
    import numpy as np
    from PIL import Image

    if not path.exists():
        pixels = np.random.default_rng(7).integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pair", choices=sorted(PAIRS), default="sd15")
    p.add_argument("--work", type=Path, required=True, help="folder for the parts, the bundle and the logs")
    p.add_argument("--parts-from", type=Path, default=None,
                   help="a parts folder of another run: the pair's parts found there are used (read only), "
                        "the others written under WORK/parts")
    p.add_argument("--backend", default="torch,ort", help="build backends (default torch,ort)")
    p.add_argument("--build-args", default="", help="more build flags, space-separated (e.g. '--cache-scheme fora')")
    p.add_argument("--vae", type=Path, default=None, help="dit: the diffusers AutoencoderKL directory (the SD VAE)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--stages", default="parts,build,check,run,diffusers",
                   help="comma list of parts, build, check, run, diffusers, cache (default: all but cache)")
    p.add_argument("--run-backends", default="ort,openvino", help="backends of the run stage (default ort,openvino)")
    p.add_argument("--check-backends", default="ort,openvino", help="backends of the check stage")
    p.add_argument("--cache-intervals", default="1,2,3",
                   help="stage cache: `run --backend ort --cache-interval N` for each N (a bundle built with "
                        "--cache-scheme fora / --cache-branch K), --repeats times each, interleaved")
    p.add_argument("--repeats", type=int, default=3, help="stage cache: runs per interval (min and median reported)")
    args = p.parse_args(argv)
    import numpy as np

    pair = PAIRS[args.pair]
    if pair.kind == "dit" and args.vae is None and {"build"} & set(args.stages.split(",")):
        p.error("--pair dit builds with a VAE: give --vae DIR (e.g. an SD 1.5 pipeline's vae/)")
    work = args.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    parts, bundle, logs = work / "parts", work / "bundle", work / "logs"
    logs.mkdir(exist_ok=True)
    shared = args.parts_from.absolute() if args.parts_from else None

    def part(name: str) -> Path:
        """Where part `name` is: under --parts-from if it is there, else under WORK/parts."""
        return shared / name if shared is not None and (shared / name).exists() else parts / name

    small, large = part(pair.small), part(pair.large)
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
        for writer, where in pair.writers:
            if where and part(where) != parts / where:
                print(f"[parts] {where}: using {part(where)}", flush=True)
                continue
            if not where and shared is not None:
                raise SystemExit(f"--parts-from: the {writer} parts are written together; give all of them or none")
            record(timed(f"parts {writer}", [py, "-m", "tstitch_trt.models.real_configs", writer,
                                            str(parts / where)], logs / f"parts-{writer}.log"))
    control = part(pair.controlnet) if pair.controlnet else None
    image = control_png(work / "control.png", pair.size) if control else None
    if "build" in stages:
        if pair.kind == "dit":
            models = ["--model", f"DiT-S/2={small}", "--model", f"DiT-XL/2={large}", "--image-size", str(pair.size),
                      "--num-classes", "1000", "--vae", str(args.vae.absolute())]
        else:
            models = ["--model", str(small), "--model", str(large)]
        extra = (["--controlnet", str(control)] if control else []) + args.build_args.split()
        extra += ["--lora", f"small={part(pair.lora)}"] if pair.lora else []
        record(timed("build", [*tst, "build", *models, "--backend", args.backend, "--batch-sizes", "1-1", *extra,
                               "--out", str(bundle)], logs / "build.log"))
        files = sorted((f for f in bundle.rglob("*") if f.is_file()), key=lambda f: str(f))
        du = sum(f.stat().st_size for f in files)
        # the torch artifacts are hard links to the parts where they share a file system: not new disk
        new = sum(f.stat().st_size for f in files if f.stat().st_nlink == 1)
        record({"stage": "bundle size", "bytes": du, "gb": round(du / 2**30, 2), "new_gb": round(new / 2**30, 2),
                "largest": {str(f.relative_to(bundle)): round(f.stat().st_size / 2**30, 3)
                            for f in files if f.stat().st_size > 50 * 2**20}})
    if "check" in stages:
        record(timed("check", [*tst, "check", "--bundle", str(bundle), "--backend", args.check_backends, "--batch", "1",
                               "--report", str(work / "check.json")], logs / "check.log"))
    lat = pair.size // 8
    init = work / "init.npy"
    sampler, cfg = pair.sampler or SAMPLER[pair.kind], pair.cfg or CFG[pair.kind]
    noise = work / "noise.npy"  # LCM: the per-call noise, zero after the last call
    if pair.sampler == "lcm" and not noise.exists():
        import torch  # diffusers' draws: the start latent, then one noise per call but the last (same_draws)

        gen = torch.Generator().manual_seed(0)
        np.save(init, torch.randn((1, 4, lat, lat), generator=gen).numpy())
        draws = np.zeros((args.steps, 1, 4, lat, lat), np.float32)
        for i in range(args.steps - 1):
            draws[i] = torch.randn((1, 4, lat, lat), generator=gen).numpy()
        np.save(noise, draws)
    if not init.exists():
        np.save(init, np.random.default_rng(0).standard_normal((1, 4, lat, lat), dtype=np.float32))
    if pair.kind == "dit":
        request = ["--class-labels", LABELS, "--seed", "0"]
    else:
        request = ["--prompt", PROMPT, "--init-noise", str(init)] + (["--control-image", str(image)] if image else [])

    def run(backend: str, stage: str, extra: tuple[str, ...] = (), tag: str = "") -> dict:
        tag = tag or backend
        if sampler == "lcm":
            script = work / "run_lcm.py"
            script.write_text(RUN_LCM)
            return record(timed(stage, [py, str(script), str(bundle), backend, str(init), str(noise),
                                        str(work / f"lat-{tag}.npy"), str(work / f"run-{tag}.json"), str(args.steps),
                                        str(args.ratio), cfg, PROMPT], logs / f"{stage}.log"))
        return record(timed(stage, [*tst, "run", "--bundle", str(bundle), "--backend", backend, *request,
                                    "--sampler", sampler, "--steps", str(args.steps), "--ratio",
                                    str(args.ratio), "--cfg-scale", cfg, *extra, "--save-latents",
                                    str(work / f"lat-{tag}.npy"), "--report", str(work / f"run-{tag}.json"),
                                    "--out", str(work / f"{tag}.png")], logs / f"{stage}.log"))

    if "run" in stages:
        for backend in args.run_backends.split(","):
            run(backend, f"run-{backend}")
    if "cache" in stages:  # per-image sampling time with feature caching (FORA / DeepCache) on ORT
        intervals = [int(n) for n in args.cache_intervals.split(",")]
        loops: dict[int, list[float]] = {n: [] for n in intervals}
        for r in range(args.repeats):
            for n in intervals:
                row = run("ort", f"cache-interval {n} #{r}", ("--cache-interval", str(n)), f"ort-cache{n}")
                if row["rc"] == 0:
                    loops[n].append(json.loads((work / f"run-ort-cache{n}.json").read_text())["loop_seconds"])
        base = work / "lat-ort-cache1.npy"
        for n in intervals:
            times = sorted(loops[n])
            got = work / f"lat-ort-cache{n}.npy"
            record({"stage": f"cache-interval {n}", "runs": len(times),
                    "loop_s_min": round(times[0], 2) if times else None,
                    "loop_s_median": round(times[len(times) // 2], 2) if times else None,
                    "vs interval 1": rel(np.load(got), np.load(base)) if got.exists() and base.exists() else None})
    ref_path = work / ("lat-torch.npy" if pair.kind == "dit" else "lat-diffusers.npy")
    if "diffusers" in stages:
        if pair.kind == "dit":
            run("torch", "reference (run --backend torch)")
        elif sampler == "lcm":
            script = work / "reference_lcm.py"
            script.write_text(REFERENCE_LCM)
            record(timed("diffusers", [py, str(script), str(small), str(large), str(part(pair.lora)), str(ref_path),
                                       str(args.steps), str(args.ratio), str(pair.size), PROMPT, cfg, "0"],
                         logs / "diffusers.log"))
        else:
            script = work / "reference.py"
            script.write_text(REFERENCE)
            record(timed("diffusers", [py, str(script), str(small), str(large), str(init), str(ref_path),
                                       str(args.steps), str(args.ratio), str(pair.size), PROMPT, pair.kind,
                                       cfg, f"{control}:{image}" if control else "-"],
                         logs / "diffusers.log"))
    if ref_path.exists():
        ref = np.load(ref_path)
        for backend in ("ort", "openvino"):
            got = work / f"lat-{backend}.npy"
            if got.exists():
                record({"stage": f"{backend} vs reference", "max_rel": rel(np.load(got), ref)})
    print("\n| stage | wall s | peak RSS GB | CPU | result |\n|---|---|---|---|---|")
    for r in rows:
        result = r.get("max_rel", r.get("gb", r.get("loop_s_median", f"rc {r.get('rc', '')}")))
        print(f"| {r['stage']} | {r.get('wall_s', '')} | {r.get('peak_rss_gb', '')} | {r.get('cpu', '')} | {result} |")
    return 0 if all(r.get("rc", 0) == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
