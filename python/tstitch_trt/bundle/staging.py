"""Atomic staging of a new bundle: written beside --out, renamed into place on success, removed on failure.

Replacing --out is allowed only for what a build created (an empty folder, or a bundle whose every file
its own manifest names), so this module reads manifests: it sits above bundle/manifest.py, which never
imports it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tstitch_trt.bundle.files import clean_stale_staging, staging_name
from tstitch_trt.bundle.manifest import read_manifest
from tstitch_trt.errors import UserError


def check_replaceable(out: Path, owned: Iterable[str] = ()) -> None:
    """Refuse an --out that holds anything a build did not create: a file, or a folder of other files.

    A folder may be replaced when it is empty, or when it is a bundle whose every file is named by
    its own manifest (or is one of `owned`, e.g. the demo pair's eval files).
    """
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UserError(f"--out {out} is a file, not a bundle directory; choose another path (nothing was written)")
    if not out.exists() or not any(out.iterdir()):
        return
    try:
        manifest = read_manifest(out)
    except UserError:
        raise UserError(f"--out {out} is a folder that is not a tstitch bundle and not empty; building would "
                        "replace its files: choose a new or empty folder (nothing was written)") from None
    named = {"manifest.json", *manifest.files()}
    prefixes = tuple(p.rstrip("/") + "/" for p in owned if p.endswith("/"))
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if path.is_dir() and not path.is_symlink():
            continue
        if rel in named or rel in owned or rel.startswith(prefixes) or manifest.in_owned_dir(rel):
            continue
        raise UserError(f"--out {out} is a bundle that also holds {rel}, which no build wrote; building would "
                        "delete it: move it away or choose another --out (nothing was written)")


@contextmanager
def staged_bundle(out_dir: str | Path, owned: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a fresh staging directory beside `out_dir`; on success it replaces `out_dir` atomically.

    On any exception (SIGTERM included: the CLI turns it into one) the staging directory is removed
    and `out_dir` is untouched. A kill -9 leaves the staging directory; the next build beside it
    removes it (its name carries the dead process id).
    """
    out = Path(out_dir).absolute()
    owned = tuple(owned)
    check_replaceable(out, owned)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the folder {out.parent} for --out ({e.strerror}); "
                        "choose another path") from None
    clean_stale_staging(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=staging_name(out, "tmp"), dir=out.parent))
    except OSError as e:
        raise UserError(f"cannot write in {out.parent} ({e.strerror}); choose a writable --out") from None
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a bundle is shared like any build output
    try:
        yield tmp
        if not (tmp / "manifest.json").is_file():
            raise RuntimeError("internal error: staged bundle has no manifest.json")
        check_replaceable(out, owned)  # again: something may have appeared during a long build
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=staging_name(out, "old"), dir=out.parent))
            os.replace(out, old / "bundle")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        left = remove_staging(tmp)
        if left is None:
            raise
        note = (f"; and the staging directory {tmp} could not be removed ({left}): delete it, or the next build "
                "here removes it")
        if isinstance(e, UserError):  # still one line: what went wrong, and what was left
            raise type(e)(f"{e}{note}") from None
        import sys

        print(f"error: {note[6:]}", file=sys.stderr)  # the failure itself is reported by the caller
        raise


def remove_staging(tmp: Path) -> str | None:
    """Remove a staging directory; None when it is gone, else why it is not (under memory exhaustion or a
    read-only file system the removal itself can fail: that is said, never left silently)."""
    errors: list[str] = []
    if not tmp.exists():
        return None
    # onerror (Python 3.11; 3.12 renames it onexc): keep going, remember the first failure
    shutil.rmtree(tmp, onerror=lambda _f, path, info: errors.append(f"{path}: {info[1]}"))
    if not tmp.exists():
        return None
    return errors[0] if errors else "it is still there"
