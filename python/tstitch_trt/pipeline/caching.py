"""A request's feature caching (DeepCache for SD, FORA for DiT): its fields checked against the bundle.

`run --cache-interval N --cache-branch K`, the Python API's cache_interval / cache_branch and serve's fields of
the same names all come here (one line, exit 2, for anything wrong). Interval 1 is no caching; the branch is
fixed when the bundle is built (`build --cache-branch K` writes each U-Net's full and cached step graphs), so
a run may leave it out or must name that one. DiT bundles (check_dit_cache): FORA, built with
`build --cache-scheme fora`; only the interval is chosen per run.
"""

from __future__ import annotations

import numbers

from tstitch_trt.bundle.manifest import Manifest
from tstitch_trt.errors import UserError
from tstitch_trt.sampling.cache_plan import MAX_CACHE_INTERVAL


def _interval(interval: object) -> int:
    """A request's cache interval (None = 1, no caching), or one line saying what is wrong."""
    if interval is None:
        return 1
    if isinstance(interval, bool) or not isinstance(interval, numbers.Integral):
        raise UserError(f"cache_interval must be a whole number (1 = no caching), got {interval!r}")
    if not 1 <= int(interval) <= MAX_CACHE_INTERVAL:
        raise UserError(f"--cache-interval must be between 1 (no caching) and {MAX_CACHE_INTERVAL}, got {interval}")
    return int(interval)


def check_cache(manifest: Manifest, interval: object, branch: object) -> tuple[int, int | None]:
    """(interval, branch) of a request, or one line saying what is wrong and what to do."""
    n = _interval(interval)
    if branch is not None and (isinstance(branch, bool) or not isinstance(branch, numbers.Integral)):
        raise UserError(f"cache_branch must be a whole number (DeepCache's cache_branch_id), got {branch!r}")
    built = None if manifest.cache is None else int(manifest.cache["branch"])
    if branch is not None and built is None:
        raise UserError(f"--cache-branch {branch}: this bundle was built without cached step graphs; rebuild it with "
                        f"`tstitch-trt build ... --cache-branch {branch}`")
    if branch is not None and int(branch) != built:
        raise UserError(f"--cache-branch {branch}: this bundle's cached step graphs keep branch {built}; run with "
                        f"--cache-branch {built}, or rebuild it with --cache-branch {branch}")
    if n > 1 and built is None:
        raise UserError("--cache-interval needs cached step graphs, which this bundle was built without; rebuild it "
                        "with `tstitch-trt build ... --cache-branch K` (DeepCache's branch, e.g. 0)")
    return n, built if n > 1 or branch is not None else None


def check_dit_cache(manifest: Manifest, interval: object, branch: object = None) -> int:
    """A DiT request's FORA interval, or one line saying what is wrong and what to do.

    FORA keeps every block's attention and MLP outputs: it has no branch, so cache_branch is refused (never
    ignored). The cached graphs come from `build --cache-scheme fora`."""
    n = _interval(interval)
    if branch is not None:
        raise UserError(f"--cache-branch {branch!r}: DiT bundles cache with FORA (every block's attention and MLP "
                        "outputs), which has no branch (DeepCache's, for SD U-Nets); leave --cache-branch out")
    if n > 1 and manifest.cache is None:
        raise UserError("--cache-interval needs FORA's cached step graphs, which this bundle was built without; "
                        "rebuild it with `tstitch-trt build ... --cache-scheme fora`")
    return n
