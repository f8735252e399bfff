"""The evaluator's digit classifier: a small CNN whose penultimate layer is the Frechet feature space.

Trained here on the same 4,500 training digits as the denoisers, exported to ONNX with two
outputs (logits, features) so the evaluator (tstitch_trt.eval) runs it without torch.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FEATURE_DIM = 128


class DigitClassifier(nn.Module):
    """(B, 1, 32, 32) in [-1, 1] -> (logits (B, 10), features (B, FEATURE_DIM))."""

    def __init__(self, num_classes: int = 10, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),  # 16
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),  # 8
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.MaxPool2d(2),  # 4
        )
        self.fc = nn.Linear(128 * 4 * 4, feature_dim)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = F.relu(self.fc(self.conv(x).flatten(1)))
        return self.head(self.drop(features)), features


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Translate each digit by up to max_shift pixels (the 2-px padding plus MNIST's margin keep it whole)."""
    shifts = torch.randint(-max_shift, max_shift + 1, (x.shape[0], 2), generator=gen)
    moved = [torch.roll(img, (int(dy), int(dx)), dims=(1, 2)) for img, (dy, dx) in zip(x, shifts, strict=True)]
    return torch.stack(moved)


def train_classifier(images: np.ndarray, labels: np.ndarray, epochs: int, seed: int, batch: int = 128,
                     log=None) -> tuple[DigitClassifier, float]:
    """Adam with a cosine decay; images (N, 1, 32, 32) float in [-1, 1]. Returns (model, seconds)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitClassifier()
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    steps_per_epoch = -(-len(x) // batch)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * steps_per_epoch)
    t0 = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        total, correct, seen = 0.0, 0, 0
        for i in range(steps_per_epoch):
            idx = perm[i * batch:(i + 1) * batch]
            xb = random_shift(x[idx], gen)
            logits, _ = model(xb)
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
            seen += len(idx)
        if log:
            log({"model": "classifier", "epoch": epoch + 1, "loss": total / seen, "train_acc": correct / seen,
                 "elapsed_s": time.perf_counter() - t0})
    return model.eval(), time.perf_counter() - t0


@torch.no_grad()
def accuracy(model: DigitClassifier, images: np.ndarray, labels: np.ndarray) -> float:
    logits, _ = model.eval()(torch.from_numpy(images))
    return float((logits.argmax(1).numpy() == labels).mean())


def export_classifier(model: DigitClassifier, path: Path) -> None:
    import warnings

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(2, 1, 32, 32),), str(path), input_names=["image"],
                          output_names=["logits", "features"], opset_version=18, do_constant_folding=True,
                          dynamic_axes={"image": {0: "B"}, "logits": {0: "B"}, "features": {0: "B"}}, dynamo=False)
