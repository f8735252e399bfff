"""The demo pair's digit classifier on ONNX Runtime: logits and penultimate features, no torch.

The bundle's eval/ directory holds classifier.onnx (outputs "logits", "features"), the 500
held-out real digits (heldout.npz, uint8 32x32) and eval.json with their sha256 checksums.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tstitch_trt.bundle.manifest import sha256_file
from tstitch_trt.demo.data import to_model_range
from tstitch_trt.errors import UserError

EVAL_INDEX = "eval/eval.json"


def _verified(bundle: Path, rel: str, index: dict) -> Path:
    path = bundle / rel
    if not path.is_file():
        raise UserError(f"{path} is missing; rebuild the demo pair with `python -m tstitch_trt.demo.train`")
    want = index.get("sha256", {}).get(rel)
    if want is None or sha256_file(path) != want:
        raise UserError(f"checksum mismatch for {path}: it changed since the build; rebuild the demo pair")
    return path


class DigitScorer:
    """Class logits and Frechet features of 32x32 digit images, with the held-out reference set."""

    def __init__(self, bundle_dir: str | Path, threads: int = 0):
        import onnxruntime as ort

        self.bundle = Path(bundle_dir)
        index_path = self.bundle / EVAL_INDEX
        if not index_path.is_file():
            raise UserError(f"{self.bundle} has no {EVAL_INDEX}: quality evaluation needs the demo pair's "
                            "classifier (a bundle written by `python -m tstitch_trt.demo.train`)")
        self.index = json.loads(index_path.read_text())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        model = _verified(self.bundle, "eval/classifier.onnx", self.index)
        self.session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        with np.load(_verified(self.bundle, "eval/heldout.npz", self.index), allow_pickle=False) as ref:
            self.heldout_images, self.heldout_labels = ref["images"], ref["labels"].astype(np.int64)

    def __call__(self, images: np.ndarray, batch: int = 250) -> tuple[np.ndarray, np.ndarray]:
        """(logits (B, 10), features (B, D)) for uint8 images."""
        x = to_model_range(images)
        outs = [self.session.run(["logits", "features"], {"image": x[i:i + batch]}) for i in range(0, len(x), batch)]
        return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])
