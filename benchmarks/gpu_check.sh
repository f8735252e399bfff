#!/usr/bin/env bash
# One GPU check for a bare NVIDIA machine with python3 + torch (CUDA) + onnx +
# onnxruntime (CPU) + cuda-python + cupy, and NO TensorRT and no diffusers:
#   1. the GPU tests (tests/test_runtime_gpu.py): runtime/cuda.py (buffers, events, graph capture,
#      out-of-memory), TrtBackend on real CUDA streams and graphs with cupy stand-in engines, the
#      torch backend's CUDA graph against eager; the real-TensorRT and ORT-CUDA tests skip, with a
#      reason, unless tensorrt / tensorrt_rtx / onnxruntime-gpu are importable;
#   2. timings (benchmarks/gpu_check.py): torch-CUDA eager vs whole-trajectory CUDA graph vs the
#      reference loop, DiT-S/2 -> DiT-XL/2 at 256 px, batch 8, DDIM 100, cfg 1.5, ratio 0.4;
#   3. SD timings (benchmarks/gpu_check_sd.py): random BK-SDM-Tiny -> SD 1.5 U-Nets, 512 px, batch 1,
#      PNDM 50, ratio 0.4, torch-CUDA eager vs graph vs diffusers' StableDiffusionPipeline with the
#      callback switch. Needs diffusers (+ transformers, tokenizers, huggingface_hub, safetensors,
#      regex) carried in .whl/; without them it records "skipped" and why.
#   3b. SDXL timings (gpu_check_sd.py --pair sdxl): random SSD-1B -> SDXL base U-Nets (real configs), 1024 px,
#      batch 1, Euler 8 steps, cfg 5.0, ratio 0.4, the same three ways (diffusers: StableDiffusionXLPipeline).
#   4. the C++ runtime: nvcc build, its CUDA tests, host overhead per step (benchmarks/gpu_check_cpp.sh).
# Its steps' time caps add up to about 18 minutes, more than one device command may run (600 s): pick
# steps with GPU_CHECK_STEPS (default "1 2 3 3b 4"), e.g. two calls: GPU_CHECK_STEPS="1 2 3", then "3b 4".
# Writes $OUT/gpu_check.json, $OUT/gpu_check_sd.json, $OUT/gpu_check_sdxl.json (+ gpu_tests.log, gpu_check.log). Run from anywhere:
#   bash benchmarks/gpu_check.sh                 # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu-dry-run   # here: tiny models on the CPU, same code paths
#
# Nothing is installed from a network: the package runs from python/ via PYTHONPATH. Wheels
# carried in .whl/ (git-ignored) are installed into /tmp/site first. The test fixtures export
# ONNX and need onnx-graphsurgeon, which that image lacks; carry it:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl onnx-graphsurgeon==0.6.1
# TensorRT cannot come along (the tensorrt-rtx wheels are ~95 MB, libtensorrt_rtx.so 234 MB,
# over the 64 MiB a run may carry), so the real-engine tests skip there.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
DRY=()
[[ "${1:-}" == "--cpu-dry-run" ]] && DRY=(--cpu-dry-run)
STEPS=" ${GPU_CHECK_STEPS:-1 2 3 3b 4} "
want() { [[ "$STEPS" == *" $1 "* ]] || { echo "step $1: not in GPU_CHECK_STEPS, skipped"; return 1; }; }
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/python:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
[[ ${#DRY[@]} -gt 0 ]] && export OMP_NUM_THREADS=1  # a shared 2-core machine: no thread thrashing

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

"$PY" - <<'EOF' 2>&1 | tee "$OUT/environment.txt"
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
from tstitch_trt.runtime.cuda import device_count
print("cuda devices (cuda-python):", device_count())
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
    | tee -a "$OUT/environment.txt"

tests_rc=0 bench_rc=0 sd_rc=0 sdxl_rc=0 cpp_rc=0 summary="not run"
# 1. GPU tests (the CPU ones in that file run too: they are quick)
if want 1; then
    timeout 120 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_runtime_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
    tests_rc=${PIPESTATUS[0]}
    summary=$(grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -n 1)
fi

# 2. timings (own budget; what would start after it is recorded as skipped)
if want 2; then
    timeout 220 "$PY" benchmarks/gpu_check.py "${DRY[@]}" --out "$OUT/gpu_check.json" --budget-s 150 \
        --tests-rc "$tests_rc" --tests-summary "$summary" 2>&1 | tee "$OUT/gpu_check.log"
    bench_rc=${PIPESTATUS[0]}
fi

# 3. SD timings (own budget)
if want 3; then
    timeout 150 "$PY" benchmarks/gpu_check_sd.py "${DRY[@]}" --out "$OUT/gpu_check_sd.json" 2>&1 \
        | tee "$OUT/gpu_check_sd.log"
    sd_rc=${PIPESTATUS[0]}
fi
# 3b. SDXL timings (own budget): random SSD-1B -> SDXL base U-Nets, 1024 px, batch 1, 8 Euler steps, cfg 5.0
if want 3b; then
    timeout 150 "$PY" benchmarks/gpu_check_sd.py "${DRY[@]}" --pair sdxl --out "$OUT/gpu_check_sdxl.json" 2>&1 \
        | tee "$OUT/gpu_check_sdxl.log"
    sdxl_rc=${PIPESTATUS[0]}
fi
# 4. the C++ runtime (benchmarks/gpu_check_cpp.sh: nvcc build, its CUDA tests, loop host overhead per step);
#    carry .cpp-deps (bash benchmarks/gpu_check_cpp.sh --stage) where the Debian dev packages are missing
if [[ ${#DRY[@]} -eq 0 ]] && want 4; then
    OUT="$OUT" timeout 420 bash benchmarks/gpu_check_cpp.sh 2>&1 | tee "$OUT/gpu_check_cpp.log"
    cpp_rc=${PIPESTATUS[0]}
fi
echo "gpu tests: rc=$tests_rc ($summary); timings: rc=$bench_rc; SD timings: rc=$sd_rc; SDXL timings: rc=$sdxl_rc;" \
     "C++: rc=$cpp_rc; results in $OUT"
[[ $tests_rc -eq 0 && $bench_rc -eq 0 && $sd_rc -eq 0 && $sdxl_rc -eq 0 && $cpp_rc -eq 0 ]]
