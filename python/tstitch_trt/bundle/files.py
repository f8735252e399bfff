"""A bundle's files: sealed paths, checksums, and the names of staging directories (bundle/staging.py
stages a new bundle; it needs the manifest, this module does not).

Sealed: every path a manifest names resolves inside the bundle directory (symlinks included), so a
bundle never makes the engine read outside its own directory. Checksums are memoized by the file's
identity and change time (device, inode, size, mtime and ctime: st_ctime changes on every write and
cannot be set back from user space), in the process and in the user's cache directory
($XDG_CACHE_HOME/tstitch-trt/verified, beside the compiled models), so each version of a file is hashed
once: a 5.2 GB SD 1.5 bundle cost every `run` 7-10 s of hashing before. Any later write to a file changes
its ctime and is hashed again; `check` (fresh=True) always hashes everything.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
from pathlib import Path

from tstitch_trt.errors import BundleError

_verified: dict[tuple, str] = {}
MEMO_ENV = "TSTITCH_VERIFY_CACHE"  # where verified checksums are remembered across processes; "off" = nowhere


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


def _memo_dir() -> Path | None:
    root = os.environ.get(MEMO_ENV)
    if root == "off":
        return None
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(base) / "tstitch-trt" / "verified")
    return Path(root)


def _memo_file(key: tuple) -> Path | None:
    memo = _memo_dir()
    return None if memo is None else memo / hashlib.sha256(repr(key).encode()).hexdigest()


def _memo_get(key: tuple) -> str | None:
    path = _memo_file(key)
    try:
        digest = path.read_text().strip() if path is not None else ""
    except (OSError, UnicodeDecodeError):
        return None
    return digest if re.fullmatch(r"[0-9a-f]{64}", digest) else None


def _memo_put(key: tuple, digest: str) -> None:
    """Best effort: a read-only or full cache directory only means hashing again next time."""
    path = _memo_file(key)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(digest)
        os.replace(tmp, path)
    except OSError:
        pass


def checked_file(bundle_dir: str | Path, rel: str, sha256: str | None, verify: bool = True,
                 fresh: bool = False) -> Path:
    """A bundle file: inside the bundle, a regular file, and (verify) matching its recorded sha256; fresh:
    hash it even if this version of the file was verified before (`check`)."""
    path = inside(bundle_dir, rel)
    try:
        st = path.stat()
    except OSError:
        raise BundleError(f"bundle file {rel} is missing from {bundle_dir}; rebuild the bundle") from None
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"bundle file {rel} is not a regular file; rebuild the bundle")
    if verify and sha256 is not None:
        key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        digest = None if fresh else _verified.get(key) or _memo_get(key)
        if digest is None:
            try:
                digest = sha256_file(path)
            except OSError as e:
                raise BundleError(f"cannot read bundle file {rel} ({e.strerror}); check its permissions") from None
            if digest == sha256:
                _memo_put(key, digest)
        if digest != sha256:
            raise BundleError(f"checksum mismatch for bundle file {rel}: it changed since the build "
                              "(corrupted or tampered with); rebuild the bundle")
        _verified[key] = digest
    return path


# --- staging a new bundle -------------------------------------------------------------------------------
def staging_name(out: Path, kind: str) -> str:
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
