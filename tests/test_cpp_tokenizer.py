"""The C++ CLIP tokenizer (cpp/src/clip_tokenizer.cpp) against `tokenizers` on the bundle's tokenizer.json.

A generated corpus of prompts (unicode scripts, accents composed and decomposed, emoji sequences, whitespace runs of
every kind, contractions, special-token text, over-long prompts) through both: the ids before padding equal
`tokenizers`' encode(), and the padded rows equal pipeline/text.py's PromptTokenizer (what Python feeds the text
encoder). The C side is cpp/tests/tokenize_tool.cpp from the C++ build (build/, or TSTITCH_CPP_BUILD).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[1]
BUILD = Path(os.environ.get("TSTITCH_CPP_BUILD", ROOT / "build"))
TOOL = BUILD / "cpp" / "tests" / "tstitch_tokenize"

pytestmark = pytest.mark.skipif(not TOOL.exists(), reason=f"no C++ build at {BUILD} (scripts/test_cpp.sh builds it; "
                                                          "TSTITCH_CPP_BUILD points elsewhere)")

FIXED = [
    "", " ", "a photo of a cat", "A PHOTO OF A CAT", "café crème brûlée", "cafe\u0301 cre\u0300me", "naïve façade",
    "İstanbul", "ΟΔΟΣ ΣΟΦΊΑ", "Straße GROSS", "ﬁne ﬂour", "日本語のテキスト、漢字", "한국어 문장", "Привет, мир!",
    "مرحبا بالعالم", "नमस्ते दुनिया", "emoji 🦊🔥 👩‍🚀 🏳️‍🌈 ❤️ 👍🏽", "tabs\tand\nnewlines\r\nend", "  multiple   spaces  ",
    "\u00a0nbsp\u3000ideographic\u2003em\u2028line\u0085nel", "it's don't we're I've I'm we'll he'd", "IT'S WE'LL",
    "''s '''", "rock'n'roll o'clock", "numbers 12345 3.14 ½ ² ٣ ⅷ", "<|startoftext|>hi<|endoftext|>",
    "<|STARTOFTEXT|> <|endoftext|x", "a<|endoftext|>b<|startoftext|>c", "a" * 300, " ".join(["word"] * 100),
    "!!!???... ---- ____", "$100 @user #tag ~/path",
    "a\u200bb\u200dc", "x\u0308\u0301 y\u0327", "ǅ ǈ ǋ", "ⅰⅱⅲ Ⅳ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛", "\u0130i\u0307", "ﬀ ﬃ ﬅ", "Ǆemo",
    "a masterpiece, best quality, (highly detailed:1.2), [blurry], {cinematic}", "supercalifragilisticexpialidocious",
]

# well-established blocks only (Unicode versions differ between ICU and Rust's tables at the edges)
RANGES = [(0x20, 0x7E), (0xA0, 0xFF), (0x100, 0x17F), (0x370, 0x3CE), (0x400, 0x44F), (0x4E00, 0x4FFF),
          (0xAC00, 0xAD00), (0x3040, 0x309F), (0x0600, 0x064A), (0x0900, 0x0963), (0x1F300, 0x1F5FF),
          (0x1F600, 0x1F64F), (0x2000, 0x206F), (0x2190, 0x21FF), (0x0300, 0x036F), (0xFB00, 0xFB06),
          (0x2150, 0x218B), (0x2460, 0x24FF)]
SPACES = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2009", "\u200a", "\u202f"]


def corpus(n: int, vocab_words: list[str], seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = list(FIXED)
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 60)):
            kind = rng.random()
            if kind < 0.45:
                w = rng.choice(vocab_words)
                parts.append(w.upper() if rng.random() < 0.1 else w.capitalize() if rng.random() < 0.2 else w)
            elif kind < 0.75:
                lo, hi = rng.choice(RANGES)
                parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 6))))
            elif kind < 0.85:
                parts.append(rng.choice(["'s", "'t", "'re", "'ll", "'d", "'m", "'ve", "'", "''", "<|endoftext|>",
                                         "<|startoftext|>", "...", "!?", "1", "42", "3.5"]))
            parts.append(rng.choice(SPACES) if rng.random() < 0.8 else "")
        out.append("".join(parts))
    return out


@pytest.fixture(scope="module")
def bundle_tokenizer(sd_bundle):
    manifest = json.loads((sd_bundle / "manifest.json").read_text())
    return sd_bundle, manifest["tokenizer"]


def test_ids_equal_tokenizers_on_a_generated_corpus(tmp_path, bundle_tokenizer):
    from tokenizers import Tokenizer

    from tstitch_trt.pipeline.text import PromptTokenizer

    bundle, entry = bundle_tokenizer
    path = bundle / entry["file"]["file"]
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.no_truncation()
    words = [w.removesuffix("</w>") for w in tok.get_vocab() if w.isascii() and w.endswith("</w>") and len(w) > 5]
    prompts = corpus(3000, sorted(words))
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    args = [str(TOOL), str(path), str(entry["max_length"]), str(entry["pad_id"]), str(tmp_path / "prompts.json"),
            str(tmp_path / "ids.json")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    got = json.loads((tmp_path / "ids.json").read_text())
    want_full = [e.ids for e in tok.encode_batch(prompts)]
    bad = [(p, g, w) for p, g, w in zip(prompts, got["full"], want_full, strict=True) if g != w]
    assert not bad, f"{len(bad)} of {len(prompts)} prompts differ; first: {bad[0]!r}"
    padded, truncated = PromptTokenizer(bundle, entry)(prompts)
    assert got["padded"] == padded.tolist()
    assert got["truncated"] == truncated
    assert sum(truncated) > 50 and sum(not t for t in truncated) > 50  # both paths are exercised
    assert sum(len(w) for w in want_full) > 100_000


def test_tampered_or_foreign_tokenizer_is_one_line(tmp_path, bundle_tokenizer):
    bundle, entry = bundle_tokenizer
    src = json.loads((bundle / entry["file"]["file"]).read_text())
    cases = {"broken.json": "{ not json",
             "wordpiece.json": json.dumps({**src, "model": {**src["model"], "type": "WordPiece"}}),
             "normalizer.json": json.dumps({**src, "normalizer": {"type": "NFKC"}})}
    (tmp_path / "p.json").write_text(json.dumps(["a cat"]))
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        proc = subprocess.run([str(TOOL), str(tmp_path / name), "77", str(entry["pad_id"]), str(tmp_path / "p.json"),
                               str(tmp_path / "o.json")], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, name
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: the bundle's tokenizer"), (name, proc.stderr)
