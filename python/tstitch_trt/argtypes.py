"""argparse value types shared by every command (run, build, check, bench, serve).

Each refuses a bad value (NaN, inf, out of range, not a number) in one line, which argparse prints
as `error: argument --flag: ...` and exit code 2.
"""

from __future__ import annotations

import argparse
import math

MAX_SEED = 2**64 - 1


def finite(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def positive(text: str) -> float:
    v = finite(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v:g}")
    return v


def unit(text: str) -> float:
    v = finite(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1] (the share of early steps on the small model), got {v:g}")
    return v


def non_negative(text: str) -> float:
    v = finite(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v:g}")
    return v


def int_in(lo: int, hi: int):  # -> argparse type
    def parse(text: str) -> int:
        try:
            v = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}, got {v}")
        return v

    parse.__name__ = "integer"
    return parse


def parse_labels(text: str) -> list[int]:
    try:
        labels = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"class labels must be integers separated by commas, got {text!r}") from None
    if not labels:
        raise argparse.ArgumentTypeError("give at least one class label")
    return labels


def parse_fractions(text: str) -> list[float]:
    vals = [finite(v) for v in text.split(",")]
    if any(v < 0 for v in vals):
        raise argparse.ArgumentTypeError(f"fractions must be >= 0, got {text!r}")
    return vals


def parse_batch_sizes(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    try:
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch-sizes takes N or MIN-MAX, got {text!r}") from None
    if not 1 <= a <= b <= 65536:
        raise argparse.ArgumentTypeError(f"--batch-sizes needs 1 <= MIN <= MAX <= 65536, got {text!r}")
    return a, b
