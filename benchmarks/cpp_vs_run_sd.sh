#!/usr/bin/env bash
# The C API (cpp/tests/tstitch_sample_dump, a C11 program over libtstitch) against `tstitch-trt run --backend openvino`
# on one SD bundle: the same request (512 px, PNDM 4 steps, ratio 0.4, CFG 7.5, the prompt as text, seed 0), each a
# whole process under /usr/bin/time -v and the big-memory lock, C then Python, REPEATS times; then C's latents and
# image against Python's, and a summary (benchmarks/cpp_vs_run_sd.py).
#   benchmarks/cpp_vs_run_sd.sh BUNDLE WORK PRECISION [REPEATS] [CACHE_DIR]
# CACHE_DIR: both sides' OpenVINO compiled-model cache ($TSTITCH_OPENVINO_CACHE); default none (an unwritable path:
# every process compiles, on both sides). Run from the repository root with the C++ build in build/.
set -euo pipefail
BUNDLE=$1 WORK=$2 PREC=$3 REPEATS=${4:-3}
export TSTITCH_OPENVINO_CACHE=${5:-/proc/tstitch-no-cache}
LOCK=${LOCK:-/work/bigmem.lock}
PY=${PYTHON:-python}
PROMPT="a photograph of an astronaut riding a horse"
mkdir -p "$WORK"
printf '%s\0' "$PROMPT" > "$WORK/prompt.txt"
for r in $(seq 1 "$REPEATS"); do
    flock "$LOCK" /usr/bin/time -v -o "$WORK/c-$PREC-$r.time" build/cpp/tests/tstitch_sample_dump bundle="$BUNDLE" \
        engine=openvino precision="$PREC" steps=4 sampler=pndm ratio=0.4 cfg=7.5 seed=0 height=512 width=512 batch=1 \
        prompts="$WORK/prompt.txt" out="$WORK/c-$PREC.f32" rgb="$WORK/c-$PREC.u8" > "$WORK/c-$PREC-$r.out"
    flock "$LOCK" /usr/bin/time -v -o "$WORK/py-$PREC-$r.time" "$PY" -m tstitch_trt.cli run --bundle "$BUNDLE" \
        --backend openvino --precision "$PREC" --prompt "$PROMPT" --steps 4 --sampler pndm --ratio 0.4 --cfg-scale 7.5 \
        --seed 0 --height 512 --width 512 --save-latents "$WORK/py-$PREC.npy" --out "$WORK/py-$PREC.png" \
        --report "$WORK/py-$PREC-$r.json" --no-progress > "$WORK/py-$PREC-$r.out"
done
"$PY" benchmarks/cpp_vs_run_sd.py "$WORK" "$PREC" "$REPEATS"
