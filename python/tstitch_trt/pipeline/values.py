"""The request values every pipeline refuses, one rule each (numpy-free): `run` (through the pipelines'
validate), `serve` (the same validate, before a request joins a batch) and the Python API say the same
words for the same value.

Each check raises UserError naming the flag (`--seed`) as the CLI does; serve answers the same line.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from tstitch_trt.errors import UserError

MAX_SEED = 2**64 - 1  # numpy's SeedSequence takes any non-negative int; the CLI bounds it to 64 bits
MAX_CFG_SCALE = 1e4  # beyond this the guided eps overflows fp16 engines into Inf: refused, not blamed on weights
MAX_ETA = 100.0
SHOWN_CHARS = 60  # how much of a refused value an error line quotes


def shown(value: object, _depth: int = 0) -> str:
    """A value as an error line quotes it, cut to about SHOWN_CHARS: a 10 MB field, a 5,000-digit number or a
    list nested 100,000 deep is never echoed back whole (nor walked deeply)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"a {value.bit_length()}-bit number"  # str() of one past 4300 digits raises (CPython's limit)
    if isinstance(value, list | tuple):
        if _depth >= 2:
            return f"[... {len(value)} items]"
        items = [shown(v, _depth + 1) for v in value[:8]]
        text = "[" + ", ".join(items) + (f", ... ({len(value)} items)]" if len(value) > 8 else "]")
    elif isinstance(value, dict):
        text = f"an object of {len(value)} fields"
    elif isinstance(value, str):
        text = repr(value[: SHOWN_CHARS + 1])
    else:
        text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


def cut_text(text: str, limit: int = 1000) -> str:
    """A prompt as a report carries it: whole up to `limit` characters, else its start and its length."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed must be an integer in [0, 2^64), got {shown(seed)}")
    return seed


def check_cfg_scale(cfg_scale: float) -> float:
    if not math.isfinite(cfg_scale) or abs(cfg_scale) > MAX_CFG_SCALE:
        raise UserError(f"--cfg-scale must be a finite number of reasonable size (|g| <= {MAX_CFG_SCALE:g}), "
                        f"got {cfg_scale}")
    return cfg_scale


def check_eta(eta: float) -> float:
    if not math.isfinite(eta) or not 0.0 <= eta <= MAX_ETA:
        raise UserError(f"--eta must be between 0 and {MAX_ETA:g}, got {eta}")
    return eta


def check_ratio(ratio: float) -> float:
    if not 0.0 <= ratio <= 1.0:  # NaN fails this too
        raise UserError(f"--ratio must be in [0, 1] (the share of early steps on the small model), got {ratio}")
    return ratio


def check_fractions_finite(fractions: Iterable[float]) -> None:
    values = list(fractions)
    if not all(math.isfinite(f) for f in values):
        raise UserError(f"--fractions must be finite numbers, got {shown(values)}")


def text_problem(text: str) -> str | None:
    """Why `text` cannot be a prompt (None: it can): a lone surrogate (bytes that were not UTF-8 on the command
    line, or "\\udcff" in JSON), which the tokenizers cannot take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"is not valid UTF-8 text (character {e.start} is a lone surrogate {text[e.start]!r})"
    return None


def check_text(flag: str, text: str) -> str:
    why = text_problem(text)
    if why is not None:
        raise UserError(f"{flag} {why}; give UTF-8 text")
    return text
