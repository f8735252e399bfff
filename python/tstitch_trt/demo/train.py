"""Train the built-in demo pair and write it as a bundle: `python -m tstitch_trt.demo.train`.

    python -m tstitch_trt.demo.train --out python/tstitch_trt/demo/pair     # the shipped pair
    python -m tstitch_trt.demo.train --resume ...                            # continue an interrupted run
    python -m tstitch_trt.demo.train --smoke --out /tmp/pair --work /tmp/w   # 1-2 minute end-to-end check

Trains, on the 4,500 training digits of tstitch_trt.demo.data (2 CPU threads, seeded):
  1. the evaluator's digit classifier (ONNX with logits + penultimate features),
  2. DiT-Demo-S/4 and DiT-Demo-L/4, class-conditional pixel-space DiTs with learned variance,
     L_hybrid loss, 10% label dropout to the null label (for CFG), EMA weights kept,
then builds the bundle with tstitch_trt.export.build (torch + ort) and adds eval/ (classifier,
held-out digits) and the training log. The output directory is replaced atomically.

Seeded and deterministic on a given machine (the small model's weights are bit-identical across
runs); the large model trains under bf16 autocast, whose kernels may round differently on
another CPU. The shipped pair took 67 min on 2 cores: classifier 80 s, DiT-Demo-S/4 (12,000 steps)
14 min, DiT-Demo-L/4 (10,000 steps) 52 min; its train.json and train_log.jsonl record the run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tstitch_trt.demo import DEMO_DIR
from tstitch_trt.demo.data import NUM_CLASSES, SPLIT_SEED, load_split, to_model_range
from tstitch_trt.demo.diffusion import HybridLoss
from tstitch_trt.models.checkpoints import save_dit
from tstitch_trt.models.dit import DiT, DiTConfig, dit_config

EVAL_DIR = "eval"
CLASSIFIER_FILE = f"{EVAL_DIR}/classifier.onnx"
HELDOUT_FILE = f"{EVAL_DIR}/heldout.npz"
EVAL_INDEX = f"{EVAL_DIR}/eval.json"


@dataclass(frozen=True)
class DenoiserRecipe:
    arch: str
    steps: int
    batch: int = 64
    # Constant after a linear warmup (EMA does the averaging): an EMA checkpoint taken at step N
    # is exactly what a run with steps=N produces, so a run can be stopped early reproducibly.
    lr: float = 2e-3
    warmup: int = 100
    ema_decay: float = 0.999
    label_dropout: float = 0.1  # share of labels replaced by the null label (CFG)
    grad_clip: float = 1.0
    # DiT's init draws class embeddings with std 0.02, tiny beside the timestep embedding, and a
    # short run then barely learns the class; std 1 puts both on the same scale from the start.
    label_init_std: float = 1.0
    bf16: bool = False  # bf16 autocast (fp32 master weights): 1.6x faster for the large model on AVX512-BF16
    checkpoint_every: int = 1000


SMALL = DenoiserRecipe("DiT-Demo-S/4", steps=12000)
LARGE = DenoiserRecipe("DiT-Demo-L/4", steps=10000, ema_decay=0.9995, bf16=True)
CLASSIFIER_EPOCHS = 12


def model_config(arch: str) -> DiTConfig:
    return dit_config(arch, input_size=32, in_channels=1, num_classes=NUM_CLASSES, learn_sigma=True)


def training_identity(recipe: DenoiserRecipe) -> dict:
    """What a saved state or finished stage must match to be reused: the recipe (less its length) and
    the model's shape, so changing DiT-Demo-*'s size in models/dit.py retrains instead of reusing."""
    return {**{k: v for k, v in asdict(recipe).items() if k != "steps"}, "config": asdict(model_config(recipe.arch))}


class JsonLog:
    """Append-only JSON lines: one record per logging interval."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.f = open(path, "a")  # --resume appends; a fresh run deletes the file first

    def __call__(self, record: dict) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    def rewind(self, model: str, step: int) -> None:
        """Drop `model`'s records after `step`: a resumed run logs them again from its checkpoint."""
        self.f.close()
        lines = self.path.read_text().splitlines(keepends=True)
        keep = [ln for ln in lines if not (json.loads(ln).get("model") == model and json.loads(ln)["step"] > step)]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, self.path)
        self.f = open(self.path, "a")

    def close(self) -> None:
        self.f.close()


@torch.no_grad()
def _ema_update(ema: DiT, model: DiT, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1.0 - decay)


def train_denoiser(recipe: DenoiserRecipe, images: np.ndarray, labels: np.ndarray, seed: int, log: JsonLog,
                   log_every: int = 25, checkpoint_dir: Path | None = None) -> tuple[DiT, dict]:
    """Returns (EMA model, summary). images: (N, 1, 32, 32) float32 in [-1, 1].

    Every recipe.checkpoint_every steps the EMA weights and the whole training state (model,
    optimizer, RNG, data order) go to checkpoint_dir; a run started again with the same recipe
    resumes from that state and ends with exactly the weights of an uninterrupted run.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DiT(model_config(recipe.arch))
    with torch.no_grad():
        model.y_embedder.embedding_table.weight.normal_(0.0, recipe.label_init_std, generator=gen)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    loss_fn = HybridLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / recipe.warmup))
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
    n = len(x_all)
    perm, pos = torch.randperm(n, generator=gen), 0
    acc = {"loss": 0.0, "mse": 0.0, "vb": 0.0}
    history: list[dict] = []
    first, seconds_before = 0, 0.0
    tag = recipe.arch.replace("/", "_")
    state_path = checkpoint_dir / f"{tag}-state.pt" if checkpoint_dir is not None else None
    if state_path is not None and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("identity") == training_identity(recipe) and state["seed"] == seed:
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            gen.set_state(state["gen"])
            perm, pos, first = state["perm"], state["pos"], state["step"]
            history, seconds_before = state["history"], state["seconds"]
            print(f"{recipe.arch}: resuming at step {first}", file=sys.stderr, flush=True)
    log.rewind(recipe.arch, first)  # drop this model's records from an earlier, interrupted or replaced run
    t0 = time.perf_counter()
    bar = tqdm(range(first, recipe.steps), desc=recipe.arch, unit="step", dynamic_ncols=True, file=sys.stderr,
               initial=first, total=recipe.steps)
    model.train()
    for step in bar:
        if pos + recipe.batch > n:  # epoch boundary: reshuffle (drop the ragged tail)
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + recipe.batch]
        pos += recipe.batch
        x0, y = x_all[idx], y_all[idx].clone()
        y[torch.rand(len(y), generator=gen) < recipe.label_dropout] = NUM_CLASSES
        t = torch.randint(0, loss_fn.num_timesteps, (len(y),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16):
            terms = loss_fn(model, x0, y, t, noise)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        sched.step()
        _ema_update(ema, model, min(recipe.ema_decay, (1 + step) / (10 + step)))
        for k in acc:
            acc[k] += terms[k].item()
        if (step + 1) % log_every == 0 or step + 1 == recipe.steps:
            k = (step % log_every) + 1
            rec = {"model": recipe.arch, "step": step + 1, **{m: v / k for m, v in acc.items()},
                   "lr": sched.get_last_lr()[0], "elapsed_s": round(seconds_before + time.perf_counter() - t0, 2)}
            log(rec)
            history.append(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", mse=f"{rec['mse']:.4f}")
            acc = dict.fromkeys(acc, 0.0)
        if state_path is not None and ((step + 1) % recipe.checkpoint_every == 0 or step + 1 == recipe.steps):
            # the final state too, so a longer run (--large-steps) can continue from it
            save_dit(ema, state_path.parent / f"{tag}-ema-step{step + 1}.safetensors")
            state = {"identity": training_identity(recipe), "seed": seed,
                     "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                     "sched": sched.state_dict(), "gen": gen.get_state(), "perm": perm, "pos": pos,
                     "step": step + 1, "history": history,
                     "seconds": seconds_before + time.perf_counter() - t0}
            torch.save(state, state_path.with_suffix(".tmp"))
            os.replace(state_path.with_suffix(".tmp"), state_path)
    bar.close()
    tail = history[-max(1, len(history) // 10):]  # the last 10% of training, smoothed
    summary = {"arch": recipe.arch, "seconds": round(seconds_before + time.perf_counter() - t0, 1),
               "final_loss": float(np.mean([r["loss"] for r in tail])),
               "final_mse": float(np.mean([r["mse"] for r in tail])),
               "final_vb": float(np.mean([r["vb"] for r in tail])),
               "macs_per_forward": model.config.macs_per_forward(),
               "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
               "recipe": asdict(recipe), "config": asdict(model.config)}
    return ema, summary


def fid_floor(classifier_onnx: Path, split, seed: int = 0) -> float:
    """FID of real training digits vs the held-out ones, same count: the best a generator can score."""
    import onnxruntime as ort

    from tstitch_trt.eval.frechet import feature_stats, frechet_distance

    sess = ort.InferenceSession(str(classifier_onnx), providers=["CPUExecutionProvider"])
    pick = np.random.default_rng(seed).choice(len(split.train_images), len(split.heldout_images), replace=False)
    feats = [sess.run(["features"], {"image": to_model_range(imgs)})[0]
             for imgs in (split.train_images[pick], split.heldout_images)]
    return frechet_distance(*feature_stats(feats[0]), *feature_stats(feats[1]))


def write_pair(out: Path, work: Path, checkpoints: dict[str, Path], summary: dict) -> None:
    """The bundle plus the eval files, swapped into `out` at once (bundle.staging.staged_bundle)."""
    from tstitch_trt.bundle.manifest import sha256_file
    from tstitch_trt.bundle.staging import staged_bundle
    from tstitch_trt.export.build import BuildConfig, ModelSpec, build_bundle

    owned = (f"{EVAL_DIR}/", "train.json", "train_log.jsonl")  # written below, so replaceable
    with staged_bundle(out.resolve(), owned=owned) as stage:
        build_bundle(BuildConfig(  # stages and swaps on its own: it replaces the empty `stage`
            models=[ModelSpec(arch, str(path)) for arch, path in checkpoints.items()],
            out=stage, backends=["torch", "ort"], image_size=32, downsample=1, latent_channels=1,
            num_classes=NUM_CLASSES, guidance_channels=1, batch_range=(1, 1024),
        ))
        (stage / EVAL_DIR).mkdir()
        for rel in (CLASSIFIER_FILE, HELDOUT_FILE):
            shutil.copyfile(work / rel, stage / rel)
        index = {rel: sha256_file(stage / rel) for rel in (CLASSIFIER_FILE, HELDOUT_FILE)}
        floor = fid_floor(stage / CLASSIFIER_FILE, load_split())
        (stage / EVAL_INDEX).write_text(json.dumps({"sha256": index, **summary["classifier"], "fid_floor": floor},
                                                   indent=2))
        shutil.copyfile(work / "train_log.jsonl", stage / "train_log.jsonl")
        (stage / "train.json").write_text(json.dumps(summary, indent=2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tstitch_trt.demo.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEMO_DIR, help="bundle directory (default: the packaged demo/pair)")
    p.add_argument("--work", type=Path, default=Path("build/demo-train"), help="checkpoints and logs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--small-steps", type=int, default=SMALL.steps)
    p.add_argument("--large-steps", type=int, default=LARGE.steps)
    p.add_argument("--classifier-epochs", type=int, default=CLASSIFIER_EPOCHS)
    p.add_argument("--smoke", action="store_true", help="a few steps of everything (checks the pipeline end to end)")
    p.add_argument("--resume", action="store_true",
                   help="keep the finished stages in --work and resume an interrupted one from its last checkpoint")
    p.add_argument("--bundle-only", action="store_true", help="rebuild the bundle from the checkpoints in --work")
    args = p.parse_args(argv)
    if args.smoke:
        args.small_steps, args.large_steps, args.classifier_epochs = 40, 20, 1
    torch.set_num_threads(args.threads)
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    recipes = [replace(SMALL, steps=args.small_steps), replace(LARGE, steps=args.large_steps)]
    tags = [r.arch.replace("/", "_") for r in recipes]
    checkpoints = {r.arch: work / f"{tag}-ema.safetensors" for r, tag in zip(recipes, tags, strict=True)}
    stage_file = {name: work / f"{name}.json" for name in ("classifier", *tags)}

    if not args.bundle_only:
        if not args.resume:  # a fresh run: forget every earlier stage, state and log line
            for f in [*stage_file.values(), work / "train_log.jsonl", *(work / "checkpoints").glob("*")]:
                f.unlink(missing_ok=True)
        split = load_split()
        train_x, held_x = to_model_range(split.train_images), to_model_range(split.heldout_images)
        log = JsonLog(work / "train_log.jsonl")
        if not stage_file["classifier"].is_file():
            from tstitch_trt.demo.classifier import accuracy, export_classifier, train_classifier

            clf, secs = train_classifier(train_x, split.train_labels, args.classifier_epochs, args.seed, log=log)
            held_acc = accuracy(clf, held_x, split.heldout_labels)
            print(f"classifier: {secs:.0f} s, held-out accuracy {held_acc:.4f}", flush=True)
            export_classifier(clf, work / CLASSIFIER_FILE)
            np.savez_compressed(work / HELDOUT_FILE, images=split.heldout_images, labels=split.heldout_labels)
            stage_file["classifier"].write_text(json.dumps(
                {"seconds": round(secs, 1), "epochs": args.classifier_epochs, "heldout_accuracy": held_acc,
                 "feature_dim": int(clf.fc.out_features)}, indent=2))
        for i, (recipe, tag) in enumerate(zip(recipes, tags, strict=True)):
            done = stage_file[tag]
            finished = json.loads(done.read_text()) if done.is_file() else {}
            if finished.get("recipe") == asdict(recipe) and finished.get("config") == asdict(model_config(recipe.arch)):
                continue
            ema, s = train_denoiser(recipe, train_x, split.train_labels, seed=args.seed + 1 + i, log=log,
                                    checkpoint_dir=work / "checkpoints")
            save_dit(ema, checkpoints[recipe.arch])
            print(f"{recipe.arch}: {s['seconds']:.0f} s, loss {s['final_loss']:.4f} "
                  f"(mse {s['final_mse']:.4f}, vb {s['final_vb']:.4f})", flush=True)
            done.write_text(json.dumps(s, indent=2))
        log.close()
    summary = {"seed": args.seed, "split_seed": SPLIT_SEED, "threads": args.threads, "torch": torch.__version__,
               "classifier": json.loads(stage_file["classifier"].read_text()),
               "denoisers": [json.loads(stage_file[tag].read_text()) for tag in tags]}
    write_pair(args.out, work, checkpoints, summary)
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(f"wrote {args.out} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
