"""A bundle's files: sealed paths, checksums, and atomic staging of a new bundle.

Sealed: every path a manifest names resolves inside the bundle directory (symlinks included), so a
bundle never makes the engine read outside its own directory. Checksums are memoized per process by
the file's identity and change time (st_ctime changes on every write and cannot be set back from
user space), so a long-lived process verifies each file once, and any later write is seen.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tstitch_trt.errors import BundleError, UserError

_verified: dict[tuple, str] = {}


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def inside(bundle_dir: str | Path, rel: str) -> Path:
    """`rel` resolved inside the bundle; BundleError when it (or a symlink on the way) leaves it."""
    root = Path(bundle_dir).resolve()
    if not rel or Path(rel).is_absolute() or "\\" in rel or ".." in Path(rel).parts:
        raise BundleError(f"the bundle names the file {rel!r}, which is not inside the bundle; rebuild the bundle")
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise BundleError(f"the bundle file {rel} leads outside the bundle directory (a symlink to {path}); "
                          "a bundle may only use its own files: rebuild it")
    return path


def checked_file(bundle_dir: str | Path, rel: str, sha256: str | None, verify: bool = True) -> Path:
    """A bundle file: inside the bundle, a regular file, and (verify) matching its recorded sha256."""
    path = inside(bundle_dir, rel)
    try:
        st = path.stat()
    except OSError:
        raise BundleError(f"bundle file {rel} is missing from {bundle_dir}; rebuild the bundle") from None
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"bundle file {rel} is not a regular file; rebuild the bundle")
    if verify and sha256 is not None:
        key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        digest = _verified.get(key)
        if digest is None:
            try:
                digest = sha256_file(path)
            except OSError as e:
                raise BundleError(f"cannot read bundle file {rel} ({e.strerror}); check its permissions") from None
        if digest != sha256:
            raise BundleError(f"checksum mismatch for bundle file {rel}: it changed since the build "
                              "(corrupted or tampered with); rebuild the bundle")
        _verified[key] = digest
    return path


# --- staging a new bundle -------------------------------------------------------------------------------
def _staging_name(out: Path, kind: str) -> str:
    return f".{out.name}.{kind}-{os.getpid()}-"


def _stale_pattern(out: Path) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_staging(out: Path) -> list[Path]:
    """Remove staging directories of this tool beside `out` whose building process is gone (kill -9)."""
    removed = []
    pattern = _stale_pattern(out)
    if not out.parent.is_dir():
        return removed
    for p in out.parent.iterdir():
        m = pattern.match(p.name)
        if m and p.is_dir() and not p.is_symlink() and not _alive(int(m.group(2))):
            if m.group(1) == "old" and not out.exists() and (p / "bundle").is_dir():
                os.replace(p / "bundle", out)  # killed between the two renames: put the old bundle back
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def check_replaceable(out: Path, owned: Iterable[str] = ()) -> None:
    """Refuse an --out that holds anything a build did not create: a file, or a folder of other files.

    A folder may be replaced when it is empty, or when it is a bundle whose every file is named by
    its own manifest (or is one of `owned`, e.g. the demo pair's eval files).
    """
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UserError(f"--out {out} is a file, not a bundle directory; choose another path (nothing was written)")
    if not out.exists() or not any(out.iterdir()):
        return
    from tstitch_trt.bundle.manifest import read_manifest

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
    import tempfile

    try:
        tmp = Path(tempfile.mkdtemp(prefix=_staging_name(out, "tmp"), dir=out.parent))
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
            old = Path(tempfile.mkdtemp(prefix=_staging_name(out, "old"), dir=out.parent))
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
