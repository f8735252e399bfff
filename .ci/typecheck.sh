#!/usr/bin/env bash
# Type-check the code that calls TensorRT against tensorrt-stubs, so a misspelt API
# (execute_async_v3s, create_builder_confg, ...) fails here and not on a GPU machine.
#
#   bash .ci/typecheck.sh [FILE.py ...]     (default: the TensorRT-facing modules below)
#
# Needs: pip install mypy && pip install --no-deps tensorrt-stubs==10.13.0.35.1
# (--no-deps: its `tensorrt` requirement is a placeholder that cannot install without a GPU stack).
# The stubs are copied to a temp dir and patched there: tensorrt.pyi names parameters `in`/`out`
# (Python keywords: a syntax error), lets OnnxParser.get_error return `...`, and puts a parameter
# without default after defaults in add_scale_nd. Only selected error codes count: the stubs type
# shapes as Dims where tuples work at run time, so --strict or arg-type would only report noise.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
CODES="attr-defined|call-arg|name-defined"

files=("$@")
if [ ${#files[@]} -eq 0 ]; then
    for f in python/tstitch_trt/export/trt_build.py python/tstitch_trt/export/check.py \
             python/tstitch_trt/runtime/trt_backend.py; do
        [ -f "$f" ] && files+=("$f")
    done
fi

site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ ! -f "$site/tensorrt_bindings/tensorrt.pyi" ]; then
    echo "error: tensorrt-stubs is not installed: pip install --no-deps tensorrt-stubs==10.13.0.35.1" >&2
    exit 2
fi
"$PY" -m mypy --version >/dev/null 2>&1 || { echo "error: mypy is not installed: pip install mypy" >&2; exit 2; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/stubs"
cp -r "$site/tensorrt_bindings" "$tmp/stubs/"
mkdir -p "$tmp/stubs/tensorrt" && cp "$site/tensorrt/__init__.pyi" "$tmp/stubs/tensorrt/"
"$PY" - "$tmp/stubs/tensorrt_bindings/tensorrt.pyi" <<'PYEOF'
import re, sys
path = sys.argv[1]
text = open(path).read()
def fix_def(m):  # only inside `def` lines: `in` / `out` are parameter names there
    return re.sub(r"\b(in|out): ", r"\1_: ", m.group(0))
text = re.sub(r"^\s*def .*$", fix_def, text, flags=re.M)
old = "shift: Weights = None, scale: Weights = None, power: Weights = None, channel_axis: int"
assert old in text, "add_scale_nd signature changed: update the patch in .ci/typecheck.sh"
text = text.replace(old, "shift: Weights | None, scale: Weights | None, power: Weights | None, channel_axis: int")
text, n = re.subn(r"(def get_error\(self, index: int\) -> )\.\.\.:", r"\1ParserError:", text)
assert n == 1, "OnnxParser.get_error signature changed: update the patch in .ci/typecheck.sh"
open(path, "w").write(text)
PYEOF
cat > "$tmp/mypy.ini" <<'INI'
[mypy]
# our own imports (torch, numpy, the package) are skipped: this check is about the TensorRT API
follow_imports = skip
ignore_missing_imports = True
show_error_codes = True
[mypy-tensorrt,tensorrt.*,tensorrt_bindings,tensorrt_bindings.*]
follow_imports = silent
INI

set +e
MYPYPATH="$tmp/stubs" "$PY" -m mypy --config-file "$tmp/mypy.ini" --cache-dir "$tmp/cache" \
    --no-error-summary "${files[@]}" >"$tmp/out" 2>&1
status=$?
set -e
if [ $status -gt 1 ]; then  # mypy itself failed (crash, bad arguments)
    cat "$tmp/out" >&2
    exit 2
fi
# only our files count: the stubs themselves have unresolved names (capsule, typing_extensions)
if grep -v "^$tmp/" "$tmp/out" | grep -E ": error: .*\[($CODES)\]$"; then
    echo "typecheck: TensorRT API errors above (checked ${files[*]})" >&2
    exit 1
fi
echo "typecheck: ok (${#files[@]} files against tensorrt-stubs; codes $CODES)"
