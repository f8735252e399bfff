"""What a first run on a GPU machine would trip over, checked here without one (fakes and dry runs):

- runtime/cuda.py's device probe against a fake cuda-python runtime module: a failing cudaGetDeviceCount
  is reported by the CUDA error's name with what to install (the bindings of the driver's CUDA major),
  never as "no GPU"; the extras it names exist in pyproject.toml;
- benchmarks/gpu_check.sh --cpu-dry-run: the order of its steps and the time budget cutting the tail.
"""

from __future__ import annotations

import enum
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from tstitch_trt.errors import BackendUnavailable
from tstitch_trt.runtime import cuda as cuda_rt

REPO = Path(__file__).resolve().parents[1]


class CudaError(enum.IntEnum):  # cuda.bindings.runtime.cudaError_t's values for these
    cudaSuccess = 0
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
    cudaErrorSystemDriverMismatch = 803


TEXT = {
    CudaError.cudaErrorInsufficientDriver: b"CUDA driver version is insufficient for CUDA runtime version",
    CudaError.cudaErrorNoDevice: b"no CUDA-capable device is detected",
    CudaError.cudaErrorSystemDriverMismatch: b"system has unsupported display driver / cuda driver combination",
}


def fake_cudart(count_error: CudaError = CudaError.cudaSuccess, count: int = 0, driver: int = 12040,
                runtime: int = 13000, driver_error: CudaError = CudaError.cudaSuccess) -> SimpleNamespace:
    """The calls the probe makes, as cuda.bindings.runtime answers them: (error, value) tuples, names as bytes.
    cudaDriverGetVersion gives 0 where no driver is installed."""
    ok = CudaError.cudaSuccess
    return SimpleNamespace(
        cudaError_t=CudaError,
        cudaGetDeviceCount=lambda: (count_error, count if count_error == ok else 0),
        cudaGetErrorName=lambda e: (ok, CudaError(e).name.encode()),
        cudaGetErrorString=lambda e: (ok, TEXT[CudaError(e)]),
        cudaDriverGetVersion=lambda: (driver_error, driver if driver_error == ok else 0),
        cudaRuntimeGetVersion=lambda: (ok, runtime),
    )


@pytest.fixture
def no_smi(monkeypatch, tmp_path):
    """A PATH without nvidia-smi (the probe's second source of the driver's CUDA version)."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))


def test_insufficient_driver_names_the_error_and_the_extra(monkeypatch, no_smi):
    """cuda-python 13 (CUDA 13.0 runtime) on an R550 driver (CUDA 12.4): the error's name and the fix."""
    monkeypatch.setattr(cuda_rt, "cudart", fake_cudart(CudaError.cudaErrorInsufficientDriver, driver=12040,
                                                       runtime=13000))
    probe = cuda_rt.probe_devices()
    assert probe.count == 0 and probe.error == "cudaErrorInsufficientDriver"
    assert probe.message == (
        "cudaGetDeviceCount failed: cudaErrorInsufficientDriver (CUDA driver version is insufficient for CUDA "
        "runtime version): the installed cuda-python carries the CUDA 13.0 runtime, this machine's driver supports "
        "CUDA 12.4 (cudaDriverGetVersion / nvidia-smi); install the bindings matching the driver's CUDA major: "
        "pip install 'tstitch-trt[gpu-cu12]' (or upgrade the NVIDIA driver)")
    assert cuda_rt.device_count() == 0
    with pytest.raises(BackendUnavailable) as e:
        cuda_rt.require_device(0)
    assert str(e.value) == probe.message and "no NVIDIA GPU" not in str(e.value)
    # what `info` and `--backend auto` say about a bundle's engines on that machine
    from tstitch_trt.pipeline.backends import backend_availability

    rows = backend_availability(SimpleNamespace(backends=lambda: ["trt-rtx"]))
    assert rows == [("trt-rtx", False, f"trt-rtx engines need an NVIDIA GPU: {probe.message}")]


def test_driver_version_from_nvidia_smi(monkeypatch, tmp_path):
    """Where cudaDriverGetVersion does not answer, nvidia-smi's "CUDA Version" names the driver's major."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '| NVIDIA-SMI 535.183.01   Driver Version: 535.183.01   CUDA Version: 12.2  |'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(cuda_rt, "cudart", fake_cudart(CudaError.cudaErrorInsufficientDriver, runtime=13000,
                                                       driver_error=CudaError.cudaErrorInsufficientDriver))
    msg = cuda_rt.probe_devices().message
    assert "cudaErrorInsufficientDriver" in msg and "driver supports CUDA 12.2" in msg
    assert "pip install 'tstitch-trt[gpu-cu12]'" in msg


def test_no_driver_at_all(monkeypatch, no_smi):
    """The CUDA runtime says cudaErrorInsufficientDriver where libcuda is missing; the driver version is 0."""
    monkeypatch.setattr(cuda_rt, "cudart", fake_cudart(CudaError.cudaErrorInsufficientDriver, driver=0))
    probe = cuda_rt.probe_devices()
    assert probe.error == "cudaErrorInsufficientDriver"
    assert "no NVIDIA driver answers" in probe.message and "install the NVIDIA driver" in probe.message
    assert "gpu-cu" not in probe.message  # no bindings would help


def test_no_device_and_other_errors(monkeypatch, no_smi):
    monkeypatch.setattr(cuda_rt, "cudart", fake_cudart(CudaError.cudaErrorNoDevice))
    probe = cuda_rt.probe_devices()
    assert probe.message == f"{cuda_rt.NO_GPU} (cudaGetDeviceCount: cudaErrorNoDevice)"
    monkeypatch.setattr(cuda_rt, "cudart", fake_cudart(CudaError.cudaErrorSystemDriverMismatch, driver=12080,
                                                       runtime=12090))
    probe = cuda_rt.probe_devices()
    assert probe.error == "cudaErrorSystemDriverMismatch"
    assert probe.message.startswith("cudaGetDeviceCount failed: cudaErrorSystemDriverMismatch (system has")
    assert "CUDA 12.9 runtime" in probe.message and "driver supports CUDA 12.8" in probe.message
    # bindings and driver of one CUDA major: other bindings would not help, so no install advice
    assert "pip install" not in probe.message


def test_devices_and_no_bindings(monkeypatch):
    monkeypatch.setattr(cuda_rt, "cudart", fake_cudart(count=2))
    assert cuda_rt.probe_devices() == cuda_rt.DeviceProbe(2) and cuda_rt.device_count() == 2
    monkeypatch.setattr(cuda_rt, "cudart", None)
    probe = cuda_rt.probe_devices()
    assert probe.count == 0 and probe.error is None and probe.message == cuda_rt.NO_BINDINGS


def test_gpu_extras_per_cuda_major():
    """The extras the probe names exist and pin one CUDA major each; `gpu` is the CUDA 12 one (any driver >= R525)."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["gpu-cu12"] == ["cuda-python>=12.8,<13"]
    assert extras["gpu-cu13"] == ["cuda-python>=13.0,<14"]
    assert extras["gpu"] == extras["gpu-cu12"]
    for major, extra in cuda_rt.EXTRA_FOR_MAJOR.items():
        assert extra in extras and f"<{major + 1}" in extras[extra][0]
        assert cuda_rt.install_hint(major) == f"pip install 'tstitch-trt[{extra}]'"


# -- benchmarks/gpu_check.sh: one device command, what matters most first, cut by a budget -----------------------
ORDER = ["tests", "dit", "cpp", "sd", "sdxl"]


def _gpu_check(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env})
    return proc, out


def _steps(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]


def test_gpu_check_dry_run_order_and_budget_cut(tmp_path):
    """A 60 s budget: the GPU tests run first (here they skip: no GPU), every later step is cut and says so,
    in the fixed order; the plan and each step's record are under $OUT as they happen."""
    proc, out = _gpu_check(tmp_path, "--cpu-dry-run", TSTITCH_GPU_BUDGET_S="60")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    plan = proc.stdout.splitlines()[0]
    assert plan == ("plan (budget 60 s, CPU dry run): 1. tests (cap 120 s, needs 0 s) 2. dit (cap 150 s, needs 60 s) "
                    "3. cpp (cap 180 s, needs 90 s) 4. sd (cap 120 s, needs 60 s) 5. sdxl (cap 150 s, needs 90 s)")
    assert (out / "plan.txt").read_text().strip() == plan
    lines = [line for line in proc.stdout.splitlines() if "] step " in line]
    firsts = list(dict.fromkeys(line.split("] step ")[1].split(":")[0] for line in lines))
    assert firsts == ORDER
    start = next(line for line in lines if "step tests: start" in line)
    assert int(start.split("timeout ")[1].split(" s")[0]) < 60  # min(cap 120 s, what is left of 60 s)
    for s in ORDER[1:]:
        assert any(f"step {s}: cut by the budget" in line for line in lines), proc.stdout
    records = _steps(out)
    assert [(r["step"], r["status"]) for r in records] == [("tests", "started"), ("tests", "ran")] + [
        (s, "cut by the budget") for s in ORDER[1:]]
    assert records[1]["rc"] == 0 and all(r["budget_s"] == 60 for r in records)
    log = (out / "tests.log").read_text()
    assert "skipped" in log and "needs an NVIDIA GPU" in log  # the GPU tests ran here as skips, with reasons
    assert (out / "environment.txt").is_file() and "total " in (out / "summary.txt").read_text()
    assert not (out / "gpu_check.json").exists()  # a cut step leaves nothing pretending to be a result


def test_gpu_check_dry_run_runs_a_selected_step(tmp_path):
    """GPU_CHECK_STEPS picks steps (a second call); the DiT timing step's dry run writes its full report."""
    proc, out = _gpu_check(tmp_path, "--cpu-dry-run", "--budget-s", "400", GPU_CHECK_STEPS="dit")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = _steps(out)
    assert [(r["step"], r["status"]) for r in records] == [
        ("tests", "not selected"), ("dit", "started"), ("dit", "ran"), ("cpp", "not selected"),
        ("sd", "not selected"), ("sdxl", "not selected")]
    assert "step dit: start (timeout 150 s)" in proc.stdout
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True and report["complete"] is True and report["skipped"] == []
    assert set(report["results"]) == {"fp32", "reference_fp32"}
    assert report["results"]["fp32"]["eager"]["mode"] == "steps"


@pytest.mark.parametrize("args, env, message", [
    (["--budget-s", "0"], {}, "the budget must be a whole number of seconds >= 1, got '0'"),
    ([], {"TSTITCH_GPU_BUDGET_S": "5m"}, "the budget must be a whole number of seconds >= 1, got '5m'"),
    (["--fast"], {}, "unknown argument --fast"),
    ([], {"GPU_CHECK_STEPS": "1 2"}, "GPU_CHECK_STEPS names '1'; steps: tests dit cpp sd sdxl"),
])
def test_gpu_check_refuses_bad_arguments(tmp_path, args, env, message):
    proc, out = _gpu_check(tmp_path, "--cpu-dry-run", *args, **env)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not out.exists()  # nothing written
