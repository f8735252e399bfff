#!/usr/bin/env bash
# One GPU check for a bare NVIDIA machine with python3 + torch (CUDA) + onnx + onnxruntime (CPU) +
# cuda-python + cupy, and NO TensorRT and no diffusers. ONE device command, what matters most first,
# cut by a time budget (a lent H100/H200 gives 15 minutes in all, machine start included, and at most
# 600 s per command; the default budget, 480 s, leaves room to rerun or fetch):
#   1. tests  the GPU tests (tests/test_runtime_gpu.py -m gpu): runtime/cuda.py (buffers, events, graph
#             capture, out-of-memory), TrtBackend on real CUDA streams and graphs with cupy stand-in
#             engines, the torch backend's CUDA graph against eager; the real-TensorRT tests (one per
#             kind, trt and trt-rtx) and ORT-CUDA skip, each with its own reason, where their module is absent
#   2. dit    benchmarks/gpu_check.py: torch-CUDA eager vs the whole-trajectory CUDA graph vs the
#             reference loop, DiT-S/2 -> DiT-XL/2 at 256 px, batch 8, DDIM 100, cfg 1.5, ratio 0.4
#   3. cpp    benchmarks/gpu_check_cpp.sh: the C++ runtime built with nvcc, its CUDA tests, host
#             overhead per step (not in the dry run: it needs nvcc and a GPU)
#   4. sd     benchmarks/gpu_check_sd.py: random BK-SDM-Tiny -> SD 1.5 U-Nets, 512 px, batch 1, PNDM 50,
#             torch-CUDA eager vs graph vs diffusers' pipeline with the callback switch (needs diffusers
#             + transformers, tokenizers, huggingface_hub, safetensors, regex carried in .whl/)
#   5. sdxl   the same with --pair sdxl: random SSD-1B -> SDXL base U-Nets, 1024 px, batch 1, Euler 8, cfg 5.0
# Each step has a cap (its timeout) and the least time worth starting it; a step starts only if that
# least time fits in what is left of the budget, and runs for at most min(cap, what is left): the tail
# (SD / SDXL first) is cut, and says so. Everything is written under $OUT as each step completes:
# steps.jsonl (one line as a step starts and one as it ends: status, rc, seconds), environment.txt,
# <step>.log, gpu_check.json, gpu_check_sd.json, gpu_check_sdxl.json, cpp_*.log / cpp_loop_bench.json;
# a run killed from outside still returns what finished.
#   bash benchmarks/gpu_check.sh                      # on the GPU machine (budget: TSTITCH_GPU_BUDGET_S or 480)
#   bash benchmarks/gpu_check.sh --budget-s 300       # a smaller budget
#   bash benchmarks/gpu_check.sh --cpu-dry-run        # here: tiny models on the CPU, same code paths and plan
#   GPU_CHECK_STEPS="sd sdxl" bash benchmarks/gpu_check.sh   # only some steps (e.g. a second call)
#
# Nothing is installed from a network: the package runs from python/ via PYTHONPATH. Wheels carried in
# .whl/ (git-ignored) are installed into /tmp/site first. The test fixtures export ONNX and need
# onnx-graphsurgeon, which that image lacks; carry it:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl onnx-graphsurgeon==0.6.1
# TensorRT cannot come along (the tensorrt-rtx wheels are ~95 MB, libtensorrt_rtx.so 234 MB, over the
# 64 MiB a run may carry), so the real-engine tests skip there.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out/gpu_check}"
PY="${PYTHON:-python3}"
DRY=()
BUDGET="${TSTITCH_GPU_BUDGET_S:-480}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cpu-dry-run) DRY=(--cpu-dry-run) ;;
        --budget-s) BUDGET="${2:-}"; shift ;;
        --budget-s=*) BUDGET="${1#*=}" ;;
        *) echo "gpu_check.sh: unknown argument $1 (use --cpu-dry-run, --budget-s SECONDS)" >&2; exit 2 ;;
    esac
    shift
done
if ! [[ "$BUDGET" =~ ^[0-9]+$ ]] || (( BUDGET < 1 )); then
    echo "gpu_check.sh: the budget must be a whole number of seconds >= 1, got '$BUDGET'" >&2; exit 2
fi
ORDER=(tests dit cpp sd sdxl)                   # what matters most first
declare -A CAP=([tests]=120 [dit]=150 [cpp]=180 [sd]=120 [sdxl]=150)   # seconds a step may run at most
declare -A NEED=([tests]=0 [dit]=60 [cpp]=90 [sd]=60 [sdxl]=90)        # least seconds worth starting it
SELECTED=" ${GPU_CHECK_STEPS:-${ORDER[*]}} "
for s in $SELECTED; do
    [[ -n "${CAP[$s]:-}" ]] || { echo "gpu_check.sh: GPU_CHECK_STEPS names '$s'; steps: ${ORDER[*]}" >&2; exit 2; }
done
mkdir -p "$OUT"
: > "$OUT/steps.jsonl"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/python:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
[[ ${#DRY[@]} -gt 0 ]] && export OMP_NUM_THREADS=1  # a shared 2-core machine: no thread thrashing
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
record() {  # record STEP STATUS RC SECONDS NOTE: one JSON line in steps.jsonl, written as it happens
    printf '{"step": "%s", "status": "%s", "rc": %s, "seconds": %s, "elapsed_s": %s, "budget_s": %s, "note": "%s"}\n' \
        "$1" "$2" "$3" "$4" "$(elapsed)" "$BUDGET" "${5//\"/\'}" >> "$OUT/steps.jsonl"
}

plan="plan (budget ${BUDGET} s$([[ ${#DRY[@]} -gt 0 ]] && echo ', CPU dry run')):"
for i in "${!ORDER[@]}"; do
    s=${ORDER[$i]}
    plan+=" $((i + 1)). $s (cap ${CAP[$s]} s, needs ${NEED[$s]} s)"
done
echo "$plan" | tee "$OUT/plan.txt"

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

timeout 60 "$PY" - <<'EOF' 2>&1 | tee "$OUT/environment.txt"
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "numpy", "onnx", "onnxruntime", "onnx_graphsurgeon", "cupy", "cuda.bindings", "tensorrt",
             "tensorrt_rtx"):
    try:
        mod = importlib.import_module(name)
        real = not name.startswith("tensorrt") or hasattr(mod, "Runtime")  # tensorrt-stubs: empty namespace
        print(f"{name:18s}", getattr(mod, "__version__", "?") if real else "type stubs only")
    except Exception as e:
        print(f"{name:18s} missing ({type(e).__name__})")
from tstitch_trt.runtime import cuda
probe = cuda.probe_devices()
print("cuda devices (cuda-python):", probe.count, f"- {probe.message}" if probe.message else "")
if cuda.cudart is not None:
    print("cuda-python runtime:", cuda.bindings_runtime_version(), "driver supports CUDA:", cuda.driver_cuda_version())
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
    | tee -a "$OUT/environment.txt"

declare -A RC=()
summary="not run"
run_step() {  # run_step NAME: budget check, then the step under timeout min(cap, left); output to $OUT/NAME.log
    local s=$1 left t0 t rc
    left=$(( BUDGET - $(elapsed) ))
    if [[ "$SELECTED" != *" $s "* ]]; then
        echo "[$(printf '%4d' "$(elapsed)")s] step $s: not selected (GPU_CHECK_STEPS)"
        record "$s" "not selected" null 0 "GPU_CHECK_STEPS=$SELECTED"; return
    fi
    if (( left < ${NEED[$s]} )); then
        echo "[$(printf '%4d' "$(elapsed)")s] step $s: cut by the budget (${left} s left of ${BUDGET} s, it needs ${NEED[$s]} s)"
        record "$s" "cut by the budget" null 0 "${left} s left, needs ${NEED[$s]} s"; return
    fi
    if [[ $s == cpp && ${#DRY[@]} -gt 0 ]]; then
        echo "[$(printf '%4d' "$(elapsed)")s] step $s: not in the dry run (needs nvcc and a GPU)"
        record "$s" "not in the dry run" null 0 "needs nvcc and a GPU"; return
    fi
    t=$(( left < ${CAP[$s]} ? left : ${CAP[$s]} ))
    echo "[$(printf '%4d' "$(elapsed)")s] step $s: start (timeout ${t} s)"
    record "$s" "started" null 0 "timeout ${t} s"
    t0=$(date +%s)
    case $s in
        tests)
            # shellcheck disable=SC2086  # GPU_CHECK_PYTEST_ARGS: extra pytest words
            timeout "$t" "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_runtime_gpu.py \
                ${GPU_CHECK_PYTEST_ARGS:--m gpu} 2>&1 | tee "$OUT/tests.log"
            rc=${PIPESTATUS[0]}
            summary=$(grep -E "passed|failed|error|skipped" "$OUT/tests.log" | tail -n 1) ;;
        dit)  # its own budget inside, under the step's timeout: it skips blocks rather than being killed
            timeout "$t" "$PY" benchmarks/gpu_check.py "${DRY[@]}" --out "$OUT/gpu_check.json" \
                --budget-s $(( t * 2 / 3 )) --tests-rc "${RC[tests]:--1}" --tests-summary "$summary" 2>&1 \
                | tee "$OUT/dit.log"
            rc=${PIPESTATUS[0]} ;;
        cpp)  # carry .cpp-deps (bash benchmarks/gpu_check_cpp.sh --stage) where the Debian dev packages are missing
            OUT="$OUT" CPP_BUDGET_S="$t" timeout "$t" bash benchmarks/gpu_check_cpp.sh 2>&1 | tee "$OUT/cpp.log"
            rc=${PIPESTATUS[0]} ;;
        sd)
            timeout "$t" "$PY" benchmarks/gpu_check_sd.py "${DRY[@]}" --out "$OUT/gpu_check_sd.json" 2>&1 \
                | tee "$OUT/sd.log"
            rc=${PIPESTATUS[0]} ;;
        sdxl)
            timeout "$t" "$PY" benchmarks/gpu_check_sd.py "${DRY[@]}" --pair sdxl --out "$OUT/gpu_check_sdxl.json" \
                2>&1 | tee "$OUT/sdxl.log"
            rc=${PIPESTATUS[0]} ;;
    esac
    RC[$s]=$rc
    local took=$(( $(date +%s) - t0 )) status=ran
    (( rc == 124 || rc == 137 )) && status="timed out"
    echo "[$(printf '%4d' "$(elapsed)")s] step $s: rc=$rc in ${took} s ($status)"
    record "$s" "$status" "$rc" "$took" ""
}

for s in "${ORDER[@]}"; do
    run_step "$s"
done
line="total $(elapsed) s of ${BUDGET} s:"
fail=0
for s in "${ORDER[@]}"; do
    line+=" $s=${RC[$s]:--}"
    [[ -n "${RC[$s]:-}" && "${RC[$s]}" != 0 ]] && fail=1
done
echo "$line; gpu tests: $summary; results in $OUT" | tee "$OUT/summary.txt"
exit "$fail"
