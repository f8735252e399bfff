"""Train the built-in demo pair and write it as a bundle: `python -m tstitch_trt.demo.train`.

    python -m tstitch_trt.demo.train --out python/tstitch_trt/demo/pair     # the shipped pair
    python -m tstitch_trt.demo.train --smoke --out /tmp/pair                 # 1-2 minute end-to-end check

Trains, on the 4,500 training digits of tstitch_trt.demo.data (2 CPU threads, seeded):
  1. the evaluator's digit classifier (ONNX with logits + penultimate features),
  2. DiT-Demo-S/4 and DiT-Demo-L/4, class-conditional pixel-space DiTs with learned variance,
     L_hybrid loss, 10% label dropout to the null label (for CFG), EMA weights kept,
then builds the bundle with tstitch_trt.export.build (torch + ort) and adds eval/ (classifier,
held-out digits) and the training log. The output directory is replaced atomically.
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
from tstitch_trt.models.dit import DiT, dit_config

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
    checkpoint_every: int = 1000


SMALL = DenoiserRecipe("DiT-Demo-S/4", steps=6000)
LARGE = DenoiserRecipe("DiT-Demo-L/4", steps=6000)
CLASSIFIER_EPOCHS = 12


def model_config(arch: str):
    return dit_config(arch, input_size=32, in_channels=1, num_classes=NUM_CLASSES, learn_sigma=True)


class JsonLog:
    """Append-only JSON lines: one record per logging interval."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.f = open(path, "w")

    def __call__(self, record: dict) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


@torch.no_grad()
def _ema_update(ema: DiT, model: DiT, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1.0 - decay)


def train_denoiser(recipe: DenoiserRecipe, images: np.ndarray, labels: np.ndarray, seed: int, log: JsonLog,
                   log_every: int = 25, checkpoint_dir: Path | None = None) -> tuple[DiT, dict]:
    """Returns (EMA model, summary). images: (N, 1, 32, 32) float32 in [-1, 1].

    Every recipe.checkpoint_every steps the EMA weights go to checkpoint_dir (to watch a long run).
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
    t0 = time.perf_counter()
    bar = tqdm(range(recipe.steps), desc=recipe.arch, unit="step", dynamic_ncols=True, file=sys.stderr)
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
                   "lr": sched.get_last_lr()[0], "elapsed_s": round(time.perf_counter() - t0, 2)}
            log(rec)
            history.append(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", mse=f"{rec['mse']:.4f}")
            acc = dict.fromkeys(acc, 0.0)
        if checkpoint_dir is not None and (step + 1) % recipe.checkpoint_every == 0 and step + 1 < recipe.steps:
            save_weights(ema, checkpoint_dir / f"{recipe.arch.replace('/', '_')}-ema-step{step + 1}.safetensors")
    bar.close()
    tail = history[-max(1, len(history) // 10):]  # the last 10% of training, smoothed
    summary = {"arch": recipe.arch, "seconds": round(time.perf_counter() - t0, 1),
               "final_loss": float(np.mean([r["loss"] for r in tail])),
               "final_mse": float(np.mean([r["mse"] for r in tail])),
               "final_vb": float(np.mean([r["vb"] for r in tail])),
               "macs_per_forward": model.config.macs_per_forward(),
               "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
               "recipe": asdict(recipe)}
    return ema, summary


def save_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def fid_floor(classifier_onnx: Path, split, seed: int = 0) -> float:
    """FID of real training digits vs the held-out ones, same count: the best a generator can score."""
    import onnxruntime as ort

    from tstitch_trt.eval.frechet import feature_stats, frechet_distance
    from tstitch_trt.eval.scorer import to_classifier_input

    sess = ort.InferenceSession(str(classifier_onnx), providers=["CPUExecutionProvider"])
    pick = np.random.default_rng(seed).choice(len(split.train_images), len(split.heldout_images), replace=False)
    feats = [sess.run(["features"], {"image": to_classifier_input(imgs)})[0]
             for imgs in (split.train_images[pick], split.heldout_images)]
    return frechet_distance(*feature_stats(feats[0]), *feature_stats(feats[1]))


def write_pair(out: Path, work: Path, checkpoints: dict[str, Path], summary: dict) -> None:
    """Bundle + eval files into a hidden sibling of `out`, then swap it into place."""
    from tstitch_trt.bundle.manifest import sha256_file
    from tstitch_trt.export.build import BuildConfig, ModelSpec, build_bundle

    out = out.resolve()
    stage = out.parent / f".{out.name}.build-{os.getpid()}"
    try:
        build_bundle(BuildConfig(
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
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(stage, out)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


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
    p.add_argument("--bundle-only", action="store_true", help="rebuild the bundle from the checkpoints in --work")
    args = p.parse_args(argv)
    if args.smoke:
        args.small_steps, args.large_steps, args.classifier_epochs = 40, 20, 1
    torch.set_num_threads(args.threads)
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    recipes = [replace(SMALL, steps=args.small_steps), replace(LARGE, steps=args.large_steps)]
    checkpoints = {r.arch: work / f"{r.arch.replace('/', '_')}-ema.safetensors" for r in recipes}
    summary_path = work / "summary.json"

    if not args.bundle_only:
        split = load_split()
        train_x, held_x = to_model_range(split.train_images), to_model_range(split.heldout_images)
        log = JsonLog(work / "train_log.jsonl")
        summary: dict = {"seed": args.seed, "split_seed": SPLIT_SEED, "threads": args.threads,
                         "torch": torch.__version__, "train_digits": len(train_x), "heldout_digits": len(held_x)}
        from tstitch_trt.demo.classifier import accuracy, export_classifier, train_classifier

        clf, secs = train_classifier(train_x, split.train_labels, args.classifier_epochs, args.seed, log=log)
        held_acc = accuracy(clf, held_x, split.heldout_labels)
        print(f"classifier: {secs:.0f} s, held-out accuracy {held_acc:.4f}", flush=True)
        export_classifier(clf, work / CLASSIFIER_FILE)
        np.savez_compressed(work / HELDOUT_FILE, images=split.heldout_images, labels=split.heldout_labels)
        summary["classifier"] = {"seconds": round(secs, 1), "epochs": args.classifier_epochs,
                                 "heldout_accuracy": held_acc, "feature_dim": int(clf.fc.out_features)}
        summary["denoisers"] = []
        for i, recipe in enumerate(recipes):
            ema, s = train_denoiser(recipe, train_x, split.train_labels, seed=args.seed + 1 + i, log=log,
                                    checkpoint_dir=work / "checkpoints")
            save_weights(ema, checkpoints[recipe.arch])
            print(f"{recipe.arch}: {s['seconds']:.0f} s, loss {s['final_loss']:.4f} "
                  f"(mse {s['final_mse']:.4f}, vb {s['final_vb']:.4f})", flush=True)
            summary["denoisers"].append(s)
        log.close()
        summary_path.write_text(json.dumps(summary, indent=2))
    summary = json.loads(summary_path.read_text())
    write_pair(args.out, work, checkpoints, summary)
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(f"wrote {args.out} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
