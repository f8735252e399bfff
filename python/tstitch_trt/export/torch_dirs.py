"""The torch artifacts of a bundle: a model's diffusers / transformers directory (config.json + ONE safetensors).

Where the model is exactly what its source directory holds (loaded from it, nothing fused into it) and that
directory has one safetensors file, the file is hard-linked into the bundle instead of written again: a real-size
SDXL pair's torch artifacts are 19 GB that would otherwise be serialized and stored twice on the same disk. A hard
link is the bundle's own directory entry (nothing outside the bundle is read through it), and the bundle's
checksum of it is taken as for any file: a source later rewritten in place is a checksum failure, never a silent
change. Otherwise (another file system, sharded or several weights files, a fused LoRA) the model is saved, as
one unsharded file (diffusers shards at 10 GB: the SDXL U-Net's 10.3 GB would be two files).

A DiT's torch artifact is one safetensors file (models/checkpoints.save_dit); a source checkpoint that already is
that file (safetensors, exactly the model's keys and shapes, fp32 as loaded) is hard-linked the same way
(save_dit_file): DiT-XL/2's 2.7 GB are then neither copied in memory nor written again.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

from tstitch_trt.bundle.manifest import EngineEntry, directory_entry

UNSHARDED = "1000GB"


def save_model_dir(module: Any, bundle: Path, rel_dir: str, source: str | Path | None = None,
                   **entry: Any) -> EngineEntry:
    """Write `module` (a diffusers ModelMixin or transformers PreTrainedModel) as bundle/rel_dir and return its
    entry; `source`: the directory it was loaded from unchanged (None when it was changed, or is not a
    directory)."""
    dst = Path(bundle) / rel_dir
    if source is None or not _link_source(Path(source), dst):
        module.save_pretrained(str(dst), safe_serialization=True, max_shard_size=UNSHARDED)
    return directory_entry(Path(bundle), rel_dir, **entry)


def _link_source(src: Path, dst: Path) -> bool:
    """config.json copied and the one safetensors file hard-linked from src into dst; False (dst left absent)
    where src is not such a directory or the link cannot be made."""
    if not src.is_dir() or not (src / "config.json").is_file():
        return False
    weights = [p for p in src.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt", ".pth")
               or p.name.endswith(".index.json")]
    if len(weights) != 1 or weights[0].suffix != ".safetensors":
        return False
    real = weights[0].resolve()  # a hub cache's snapshot links to its blob
    dst.mkdir(parents=True, exist_ok=True)
    try:
        os.link(real, dst / weights[0].name)
    except OSError:  # another file system, or links not allowed: written instead
        shutil.rmtree(dst)
        return False
    shutil.copyfile(src / "config.json", dst / "config.json")
    return True


def save_dit_file(model: Any, dst: Path, source: str | Path | None) -> None:
    """A DiT's weights at dst (what load_dit reads): `source` hard-linked where it already is that file, else
    written by save_dit. source: the checkpoint the model was loaded from unchanged (None otherwise)."""
    from tstitch_trt.models.checkpoints import save_dit

    if source is not None and _is_saved_form(Path(source), model):
        try:
            os.link(Path(source).resolve(), dst)
            return
        except OSError:  # another file system, or links not allowed: written instead
            pass
    save_dit(model, dst)


def _is_saved_form(src: Path, model: Any) -> bool:
    """src is a safetensors file of exactly `model`'s state dict keys and shapes, all fp32 (read from its header)."""
    if src.suffix != ".safetensors" or not src.is_file():
        return False
    try:
        with open(src, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 * 2**20:  # a header is a few hundred KB at most
                return False
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return False
    header.pop("__metadata__", None)
    state = model.state_dict()
    return set(header) == set(state) and all(
        header[k].get("dtype") == "F32" and list(header[k].get("shape", [])) == list(t.shape) for k, t in state.items())
