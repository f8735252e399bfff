"""The bench's progress log (stderr, one line per figure)."""

from __future__ import annotations

import sys
from collections.abc import Callable


def logger() -> Callable[[str], None]:
    def log(msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    return log
