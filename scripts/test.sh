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
pip install -e ".[build,trt-rtx,dev,demo-train,openvino,serve,serve-test]"
# the serve web page test drives Debian's chromium (playwright cannot download its own browser here)
if ! command -v chromium >/dev/null; then
    apt-get update -q && apt-get install -y -q chromium >/dev/null
fi
# TensorRT type stubs for the mypy check; --no-deps because their `tensorrt` dependency cannot install here.
pip install --no-deps tensorrt-stubs==10.13.0.35.1
# open_clip_torch ships the real CLIP BPE vocabulary the SD tests build their tokenizer from; --no-deps because
# its torchvision dependency cannot install here (the tests read the file, they never import open_clip).
pip install --no-deps open_clip_torch
# deepcache: the peer of the feature-caching conformance tests (tests/test_sd_cache.py runs its DeepCacheSDHelper);
# --no-deps because it pins its own diffusers / torch (its helper runs on the installed ones).
pip install --no-deps deepcache==0.1.1
python -m ruff check python tests benchmarks
# The README's install without torch, in its own fresh venv: every command works or says what to install.
bash scripts/smoke_no_torch.sh
# The C++ runtime (CMakeLists.txt, cpp/): build, ctest, and an ASan+UBSan build (apt packages as root).
[[ "${TSTITCH_SKIP_CPP:-0}" == 1 ]] || scripts/test_cpp.sh
# pytest last: its summary is the suite's closing line
python -m pytest -q -rs "$@"
