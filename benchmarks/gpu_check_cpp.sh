#!/usr/bin/env bash
# The C++ runtime on a lent GPU (called by benchmarks/gpu_check.sh; runs alone too):
#   1. build it with nvcc: the core, the CUDA device, toy CUDA step kernels (-DTSTITCH_CUDA_TESTS=ON);
#   2. every C++ test: the CUDA device's buffers/graph test and the stitched loop on real streams and
#      whole-trajectory CUDA graphs against the Python loop's goldens (they skip without a GPU);
#   3. tstitch_loop_bench: host overhead per step of the C++ loop, plain launches vs one CUDA graph.
# Writes $OUT/cpp_build.log, $OUT/cpp_tests.log and $OUT/cpp_loop_bench.json as each phase ends. TensorRT is not
# there, so its engine is not built. CPP_BUDGET_S (gpu_check.sh passes its step's time) bounds the phases together:
# each runs for at most min(its cap, what is left), the loop bench keeping 30 s of it.
# That machine has nvcc, cmake and ninja but maybe not the Debian dev packages; stage them here first
# (root, on this machine) and carry the folder:
#   bash benchmarks/gpu_check_cpp.sh --stage      # -> .cpp-deps/ (git-ignored, ~9 MB)
set -uo pipefail
cd "$(dirname "$0")/.."
DEPS="$PWD/.cpp-deps/usr"
if [[ "${1:-}" == "--stage" ]]; then
    # the same layout as /usr, so the packages' CMake configs find their files relative to themselves
    rm -rf .cpp-deps && mkdir -p "$DEPS/include" "$DEPS/lib/x86_64-linux-gnu/cmake" "$DEPS/share/cmake"
    cp -r /usr/include/nlohmann /usr/include/gtest /usr/include/openssl "$DEPS/include/"
    cp -r /usr/include/x86_64-linux-gnu/openssl/. "$DEPS/include/openssl/" 2>/dev/null || true  # configuration.h
    cp -r /usr/share/cmake/nlohmann_json "$DEPS/share/cmake/"
    cp /usr/lib/x86_64-linux-gnu/libgtest.a /usr/lib/x86_64-linux-gnu/libgtest_main.a "$DEPS/lib/x86_64-linux-gnu/"
    cp -r /usr/lib/x86_64-linux-gnu/cmake/GTest "$DEPS/lib/x86_64-linux-gnu/cmake/"
    mkdir -p "$DEPS/lib" && cp -L /usr/lib/x86_64-linux-gnu/libcrypto.so.3 "$DEPS/lib/" && ln -sf libcrypto.so.3 "$DEPS/lib/libcrypto.so"
    du -sh .cpp-deps
    exit 0
fi
OUT="${OUT:-$PWD/out/gpu_check}"
mkdir -p "$OUT"
B="${TSTITCH_CPP_BUILD:-/tmp/tstitch-cpp-gpu}"
args=(-DTSTITCH_CUDA_TESTS=ON -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90}")
command -v nvcc >/dev/null || args+=(-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc)
if [[ -d "$DEPS" ]]; then  # staged dependencies (see --stage)
    args+=(-DCMAKE_PREFIX_PATH="$DEPS" -DOPENSSL_ROOT_DIR="$DEPS" -DGTest_DIR="$DEPS/lib/x86_64-linux-gnu/cmake/GTest")
    export LD_LIBRARY_PATH="$DEPS/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
start=$(date +%s)
BUDGET="${CPP_BUDGET_S:-840}"
cap() {  # cap SECONDS [RESERVE]: min(SECONDS, what is left of the budget less RESERVE), at least 1
    local left=$(( BUDGET - ($(date +%s) - start) - ${2:-0} ))
    (( left < $1 )) && set -- "$left"
    (( $1 < 1 )) && set -- 1
    echo "$1"
}
{ timeout "$(cap 240 30)" cmake -S . -B "$B" -G Ninja "${args[@]}" \
    && timeout "$(cap 300 30)" cmake --build "$B" -j "$(nproc)"; } > "$OUT/cpp_build.log" 2>&1
build_rc=$?
echo "C++ build: rc=$build_rc in $(( $(date +%s) - start )) s ($(grep -E 'tstitch:' "$OUT/cpp_build.log" | tr '\n' ' '))"
[[ $build_rc -eq 0 ]] || { tail -n 30 "$OUT/cpp_build.log"; exit 1; }
timeout "$(cap 180 30)" ctest --test-dir "$B" --output-on-failure -j 4 > "$OUT/cpp_tests.log" 2>&1
tests_rc=$?
grep -E "tests passed|Skipped|Failed" "$OUT/cpp_tests.log" | tail -n 8
timeout "$(cap 120)" "$B/cpp/tests/tstitch_loop_bench" 100 8 7 32 > "$OUT/cpp_loop_bench.json"
bench_rc=$?
cat "$OUT/cpp_loop_bench.json"
echo "C++ on GPU: tests rc=$tests_rc, loop bench rc=$bench_rc; results in $OUT"
[[ $tests_rc -eq 0 && $bench_rc -eq 0 ]]
