#!/usr/bin/env bash
# The C++ runtime's CI: Debian build dependencies, then from scratch
#   cmake -S . -B build && cmake --build build && ctest --test-dir build
# plus one AddressSanitizer + UndefinedBehaviorSanitizer build running the same tests.
# No GPU and no TensorRT needed (the TensorRT engine is not built without its headers; configure
# says so). Build dirs: build/ and build-asan/ (git-ignored). Run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS=(cmake ninja-build g++ nlohmann-json3-dev libssl-dev libgtest-dev)
missing=()
for p in "${PKGS[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if [[ ${#missing[@]} -gt 0 ]]; then
    if [[ $(id -u) -ne 0 ]]; then
        echo "error: the C++ build needs: ${missing[*]}; install them (apt-get install ${missing[*]})" >&2
        exit 2
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
jobs=$(nproc)
start=$(date +%s)
cmake -S . -B build -G Ninja
cmake --build build -j "$jobs"
ctest --test-dir build --output-on-failure -j "$jobs"
# Sanitizers: the core, the fake-engine loop and the C API's bad-input paths; examples are not needed.
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DTSTITCH_SANITIZE=ON -DTSTITCH_BUILD_EXAMPLES=OFF
cmake --build build-asan -j "$jobs"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest --test-dir build-asan --output-on-failure -j "$jobs"
echo "C++ runtime: build + tests + sanitizer build + tests in $(( $(date +%s) - start )) s"
