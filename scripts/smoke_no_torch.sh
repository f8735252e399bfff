#!/usr/bin/env bash
# First use as the README describes it: `pip install .` alone (no torch) into a fresh venv, then every
# command. Each must work or say in one line what to install; none may print a traceback.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
work="$(mktemp -d)"
trap 'rm -rf "$(dirname "$venv")" "$work"' EXIT
python3 -m venv "$venv"
"$venv/bin/python" -m pip --disable-pip-version-check -q install . 2>&1 | grep -v "^WARNING: Location" || true
if "$venv/bin/python" -c "import torch" 2>/dev/null; then echo "smoke: torch is installed in the no-torch venv"; exit 1; fi
cli="$venv/bin/tstitch-trt"
fail=0
check() {  # check EXPECTED_EXIT ARGS...: run the command, demand that exit code and no traceback
  local want="$1"; shift
  local rc=0
  (cd "$work" && "$cli" "$@") >"$work/out" 2>"$work/err" || rc=$?
  if [[ "$rc" != "$want" ]] || grep -q Traceback "$work/err" "$work/out"; then
    echo "smoke FAILED: tstitch-trt $* -> exit $rc (want $want)"; cat "$work/err"; fail=1
  else
    echo "smoke ok: tstitch-trt $* -> exit $rc: $(tail -n 1 "$work/err" "$work/out" | grep -v '^==' | grep . | tail -n 1)"
  fi
}
check 0 --version
check 0 run --steps 5
check 0 run --steps 5 --out grid.jpg --report r.json --save-latents z.npy
check 0 info
check 2 check  # file checks pass, then one line: the numeric check needs PyTorch
check 2 build --model DiT-S/2=random:0 --model DiT-B/2=random:1
check 2 run --backend torch --steps 2
check 0 bench --parts steps --step-batches 1 --repeats 1 --warmup 0 --out bench
check 2 run --ratio 1.5
"$venv/bin/python" -c "
from tstitch_trt.pipeline.dit import StitchedPipeline
res = StitchedPipeline.from_bundle('demo')(class_labels=[3, 5], steps=4)
assert res.images.shape == (2, 32, 32, 1), res.images.shape
print('smoke ok: StitchedPipeline.from_bundle(\"demo\")', res.report['backend'])" || fail=1
exit "$fail"
