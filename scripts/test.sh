#!/usr/bin/env bash
# The whole test suite from a fresh clone: makes .venv, installs the CPU test stack, runs pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k stitch).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip() { python -m pip --disable-pip-version-check -q "$@"; }
# torch: the pinned CPU build (local on these machines); an unpinned torch would pull a multi-GB CUDA build.
pip install torch==2.13.0
pip install -e ".[build,trt-rtx,dev,demo-train,serve,serve-test]"
# the serve web page test drives Debian's chromium (playwright cannot download its own browser here)
if ! command -v chromium >/dev/null; then
    apt-get update -q && apt-get install -y -q chromium >/dev/null
fi
# TensorRT type stubs for the mypy check; --no-deps because their `tensorrt` dependency cannot install here.
pip install --no-deps tensorrt-stubs==10.13.0.35.1
python -m ruff check python tests benchmarks
python -m pytest -q -rs "$@"
