"""The TensorRT-facing code type-checks against tensorrt-stubs (.ci/typecheck.sh), and the check bites."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "typecheck.sh"
TRT_BUILD = ROOT / "python" / "tstitch_trt" / "export" / "trt_build.py"

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed (pip install mypy)"),
    pytest.mark.skipif(not (Path(sysconfig.get_paths()["purelib"]) / "tensorrt_bindings" / "tensorrt.pyi").is_file(),
                       reason="tensorrt-stubs is not installed (pip install --no-deps tensorrt-stubs==10.13.0.35.1)"),
    pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash"),
]


def typecheck(*files: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *map(str, files)], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}, timeout=300)


def test_tensorrt_code_typechecks():
    r = typecheck()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "typecheck: ok" in r.stdout


def test_a_misspelt_tensorrt_call_fails(tmp_path):
    launch = tmp_path / "launch.py"
    launch.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    import tensorrt as trt\n"
        "def launch(ctx: 'trt.IExecutionContext', stream: int) -> None:\n"
        "    ctx.execute_async_v3s(stream)\n"
    )
    # the builder itself, one method misspelt: proves trt_build.py is really seen through the stubs
    source = TRT_BUILD.read_text()
    assert source.count("builder.create_builder_config()") == 1
    builder = tmp_path / "trt_build_typo.py"
    builder.write_text(source.replace("builder.create_builder_config()", "builder.create_builder_confg()"))
    r = typecheck(launch, builder)
    assert r.returncode == 1, r.stdout + r.stderr
    assert 'has no attribute "execute_async_v3s"' in r.stdout and "[attr-defined]" in r.stdout
    assert 'has no attribute "create_builder_confg"' in r.stdout
