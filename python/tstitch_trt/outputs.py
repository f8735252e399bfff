"""The files a command writes (image, latents, report): checked before any work, written all or nothing.

`OutputPlan.add` refuses, before anything runs, a path that could not be written at the end: a
directory, a missing or unwritable folder (probed by creating a file there, which also holds for
root), an extension that names no format we write. `write` stages every file beside its target and
renames them into place only when all were written; on any failure none of them appears and no
existing file of the user's is touched.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from tstitch_trt.errors import UserError

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def check_writable(path: str | Path, flag: str, suffixes: tuple[str, ...] | None = None) -> Path:
    """`path` as a Path if a file can be written there later; one-line UserError otherwise."""
    p = Path(path)
    if not str(path).strip():
        raise UserError(f"{flag} is empty; give a file name")
    if p.is_dir():
        raise UserError(f"{flag} {p} is a directory; give a file name inside it")
    if suffixes is not None and p.suffix.lower() not in suffixes:
        raise UserError(f"{flag} {p}: the name must end in {' or '.join(suffixes)} (that sets the format)")
    parent = p.absolute().parent
    if not parent.exists():
        raise UserError(f"{flag} {p}: the folder {parent} does not exist; create it first")
    if not parent.is_dir():
        raise UserError(f"{flag} {p}: {parent} is not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{p.name}.probe-"):
            pass
    except OSError as e:
        raise UserError(f"{flag} {p}: cannot write in {parent} ({e.strerror or e}); choose another path") from None
    if p.exists() and not p.is_file():
        raise UserError(f"{flag} {p} exists and is not a regular file; choose another path")
    return p


class OutputPlan:
    """Outputs of one command: add() them before the work, write() them after it."""

    def __init__(self) -> None:
        self.paths: dict[str, Path] = {}

    def add(self, flag: str, path: str | Path, suffixes: tuple[str, ...] | None = None) -> Path:
        p = check_writable(path, flag, suffixes)
        for other, q in self.paths.items():
            if q.absolute() == p.absolute():
                raise UserError(f"{flag} and {other} name the same file {p}; give each its own")
        self.paths[flag] = p
        return p

    def write(self, writers: dict[str, Callable[[Path], None]]) -> None:
        """Call writers[flag](tmp) for every planned flag, then rename all into place."""
        staged: list[tuple[Path, Path]] = []
        try:
            for flag, write in writers.items():
                target = self.paths[flag]
                fd, tmp_name = tempfile.mkstemp(dir=target.absolute().parent, prefix=f".{target.name}.tmp-",
                                                suffix=target.suffix)
                os.close(fd)
                tmp = Path(tmp_name)
                staged.append((tmp, target))
                try:
                    write(tmp)
                except OSError as e:
                    raise UserError(f"{flag} {target}: writing failed ({e.strerror or e}); nothing was written") \
                        from None
                os.chmod(tmp, 0o644)  # mkstemp makes it private; an output is a normal file
            for tmp, target in staged:
                os.replace(tmp, target)
        finally:
            for tmp, _ in staged:
                if tmp.exists():
                    tmp.unlink()


def save_image(image, path: Path, ext_from: Path) -> None:  # image: PIL.Image.Image
    """Save in the format `ext_from`'s extension names (the temp file's own suffix is the same)."""
    fmt = IMAGE_FORMATS[ext_from.suffix.lower()]
    if fmt == "WEBP" and image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGB")
    image.save(path, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
