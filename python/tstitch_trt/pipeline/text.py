"""Prompt -> token ids at run time, with the `tokenizers` library (no torch, no transformers).

The bundle carries the large pipeline's tokenizer as tokenizer.json (written at build time by
transformers' CLIPTokenizer); ids are padded and truncated to the text encoder's length exactly
as diffusers calls the tokenizer (padding="max_length", truncation=True: BOS + 75 + EOS).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tstitch_trt.bundle.manifest import EngineEntry, artifact_path
from tstitch_trt.errors import UserError


class PromptTokenizer:
    def __init__(self, bundle_dir: str | Path, entry: Mapping[str, Any]):
        from tokenizers import Tokenizer

        file = EngineEntry.from_dict(entry["file"])
        path = artifact_path(bundle_dir, file)  # missing -> one line; changed -> checksum error
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:
            raise UserError(f"cannot read the bundle's tokenizer {path}: {str(e).splitlines()[0]}") from None
        self.max_length = int(entry["max_length"])
        self.pad_id = int(entry["pad_id"])
        self.tok.no_padding()
        self.tok.no_truncation()

    def __call__(self, prompts: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
        """(ids (N, max_length) int64, whether each prompt was truncated)."""
        ids = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int64)
        truncated = []
        for i, enc in enumerate(self.tok.encode_batch(list(prompts))):
            full = enc.ids
            if len(full) > self.max_length:  # keep BOS + the first tokens, end with EOS, as diffusers does
                full = full[: self.max_length - 1] + full[-1:]
            truncated.append(len(enc.ids) > self.max_length)
            ids[i, : len(full)] = full
        return ids, truncated
