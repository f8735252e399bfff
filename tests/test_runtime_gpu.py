"""The GPU runtime: TrtBackend, runtime/cuda.py, ORT on CUDA, the torch CUDA graph.

Two kinds of tests:
- CPU tests (run everywhere): TrtBackend's logic on fake CUDA + fake TensorRT (tests/fake_gpu.py)
  whose engines run the real fp32 step graphs on ONNX Runtime: trajectories, CUDA-graph caching
  and recapture, the shared scratch, capture fallback, engine refusal (compat, checksum, missing
  file, unloadable plan), out-of-memory cleanup, and imports without torch.
- GPU tests (marker gpu): skipped with a reason where there is no CUDA device or a library is
  missing. benchmarks/gpu_check.sh runs them on a GPU machine.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fake_gpu import FLAVOURS, KIND_OF, FakeCuda, make_fake_trt, ort_step, toy_plan, toy_step_for
from tstitch_trt.bundle.manifest import EngineEntry, read_manifest, sha256_file
from tstitch_trt.errors import BackendUnavailable, BundleError, UserError
from tstitch_trt.pipeline.backends import tensorrt_module
from tstitch_trt.runtime.cuda import device_count as cuda_device_count
from tstitch_trt.runtime.engine_compat import (
    builder_info,
    cc_string,
    check_engine_compat,
    rtx_targets,
    targets_gpu,
)
from tstitch_trt.runtime.loop import NonFiniteError, run_stitched
from tstitch_trt.runtime.ort_backend import OrtBackend, OrtDeviceBackend, ort_providers
from tstitch_trt.runtime.trt_backend import TrtBackend
from tstitch_trt.sampling.trajectory import plan_trajectory

REPO = Path(__file__).resolve().parents[1]
HAS_GPU = cuda_device_count() > 0
gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA device visible (cuda-python reports 0 GPUs)")


def _plan(manifest, batch, sampler="ddim", steps=8, ratio=0.4, fractions=None, seed=0):
    rng = np.random.default_rng(seed)
    shape = (batch, *manifest.latent_shape)
    x = rng.standard_normal(shape, dtype=np.float32)
    plan = plan_trajectory(sampler, steps, len(manifest.models), shape, rng, ratio=ratio, fractions=fractions)
    labels = np.arange(batch, dtype=np.int64) % manifest.num_classes
    return plan, x, labels


def _run(backend, manifest, batch, **kw):
    plan, x, labels = _plan(manifest, batch, **kw)
    return run_stitched(backend, plan, x, labels, 1.5, progress=False)


def _close(a, b, rel=1e-4):
    scale = max(1.0, float(np.max(np.abs(b))))
    return float(np.max(np.abs(a - b))) <= rel * scale


def add_fake_engines(src: Path, dst: Path, cc: str | None = "8.9", version: str | None = None,
                     module: str | None = None, plans: list[bytes] | None = None, flavour: str = "rtx") -> Path:
    """Copy a bundle and give each model an engine of the flavour's kind ("trt-rtx" / "trt"): its fp32 ONNX
    graph (or `plans`), recorded as built by the flavour's module and version for `cc` (None: portable)."""
    shutil.copytree(src, dst)
    manifest = read_manifest(dst)
    kind, api = KIND_OF[flavour], FLAVOURS[flavour]
    info = builder_info(SimpleNamespace(__name__=module or api["name"], __version__=version or api["version"]),
                        [cc] if cc else [])
    for i, m in enumerate(manifest.models):
        rel = m.engines["ort"].file if plans is None else f"trt/{i}.plan"
        if plans is not None:
            (dst / "trt").mkdir(exist_ok=True)
            (dst / rel).write_bytes(plans[i])
        m.engines[kind] = EngineEntry(file=rel, sha256=sha256_file(dst / rel), precision="fp32",
                                      batch_range=(1, 16), builder=info)
    (dst / "manifest.json").write_text(manifest.to_json())
    return dst


@pytest.fixture(scope="module")
def fake_pair(tiny_pair, tmp_path_factory) -> Path:
    return add_fake_engines(tiny_pair, tmp_path_factory.mktemp("fake") / "pair")


@pytest.fixture(scope="module")
def fake_pairs(tiny_pair, fake_pair, tmp_path_factory) -> dict[str, Path]:
    """The tiny pair with engines of each fake TensorRT flavour (rtx: trt-rtx engines; trt-*: trt engines)."""
    out = {"rtx": fake_pair}
    for flavour in FLAVOURS:
        if flavour not in out:
            out[flavour] = add_fake_engines(tiny_pair, tmp_path_factory.mktemp("fake") / flavour, flavour=flavour)
    return out


def _fake_backend(bundle: Path, cu: FakeCuda | None = None, flavour: str = "rtx", dtypes: dict | None = None,
                  **kw):
    cu = cu or FakeCuda()
    trt = make_fake_trt(cu, ort_step, scratch_for=lambda data: len(data) // 8, flavour=flavour, dtypes=dtypes)
    backend = TrtBackend(bundle, read_manifest(bundle), kind=KIND_OF[flavour], trt_module=trt, cuda=cu, **kw)
    return backend, cu, trt


# -- TrtBackend logic on fakes (CPU) -----------------------------------------------------------------------
@pytest.mark.parametrize("flavour,sampler", [("rtx", "ddim"), ("rtx", "ddpm"), ("rtx", "dpm-solver++"),
                                             ("trt-10.13", "ddpm"), ("trt-10.8", "ddim"), ("trt-10.8", "dpm-solver++")])
def test_trt_backend_matches_ort(fake_pairs, flavour, sampler):
    bundle = fake_pairs[flavour]
    manifest = read_manifest(bundle)
    ort_b = OrtBackend(bundle, manifest)
    trt_b, _, _ = _fake_backend(bundle, flavour=flavour, cuda_graph=False)
    ref = _run(ort_b, manifest, 2, sampler=sampler)
    got = _run(trt_b, manifest, 2, sampler=sampler)
    assert got.mode == "steps" and len(got.engine_ms) == 8
    assert _close(got.x, ref.x), float(np.max(np.abs(got.x - ref.x)))
    assert np.abs(ref.x).max() > 0.1  # not a comparison of zeros


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_trt_backend_contexts_per_flavour(fake_pairs, flavour):
    """How each module's contexts are made: tensorrt 10.8-10.10 has no IRuntimeConfig (the strategy is passed
    directly), 10.11+ has one without kernel specialization, TensorRT-RTX selects EAGER specialization; and a
    module without is_stream_capturable still captures the trajectory as one graph."""
    backend, cu, trt = _fake_backend(fake_pairs[flavour], flavour=flavour)
    assert len(trt.contexts) == 4
    configs = backend._configs
    if flavour == "trt-10.8":
        assert configs == [] and not hasattr(backend.engines[0], "create_runtime_config")
    else:
        assert len(configs) == 4
        assert {c.strategy for c in configs} == {trt.ExecutionContextAllocationStrategy.USER_MANAGED}
        eager = [getattr(c, "dynamic_shapes_kernel_specialization_strategy", None) for c in configs]
        assert eager == ([trt.DynamicShapesKernelSpecializationStrategy.EAGER] * 4 if flavour == "rtx" else [None] * 4)
    assert hasattr(trt.contexts[0], "is_stream_capturable") == (flavour == "rtx")
    manifest = read_manifest(fake_pairs[flavour])
    res = _run(backend, manifest, 2, sampler="ddpm")
    assert res.mode == "graph" and cu.captures == 1 and res.notes == []
    plain, _, _ = _fake_backend(fake_pairs[flavour], flavour=flavour, cuda_graph=False)
    assert np.array_equal(res.x, _run(plain, manifest, 2, sampler="ddpm").x)


@pytest.mark.parametrize("flavour", ["rtx", "trt-10.8"])
def test_trt_backend_int32_id_tensors(fake_pairs, flavour):
    """A plan may carry t and y as int32 (the manifest says int64): the runtime binds them as int32, uploads
    the tables converted, and the trajectory equals the int64 engines' bit for bit."""
    bundle = fake_pairs[flavour]
    manifest = read_manifest(bundle)
    ref, _, _ = _fake_backend(bundle, flavour=flavour)
    got_b, cu, trt = _fake_backend(bundle, flavour=flavour, dtypes={"t": np.int32, "y": np.int32})
    assert got_b.engine_io["t"]["dtype"] == np.int32 and got_b.engine_io["y"]["dtype"] == np.int32
    assert trt.DataType.INT32 in {e.get_tensor_dtype(n) for e in got_b.engines for n in ("t", "y")}
    for sampler in ("ddpm", "dpm-solver++"):
        want = _run(ref, manifest, 3, sampler=sampler)
        got = _run(got_b, manifest, 3, sampler=sampler)
        assert got.mode == "graph" and np.array_equal(got.x, want.x)
    assert got_b._buf["t_table"].nbytes == 8 * 3 * 4  # 8 steps x batch 3 int32 timesteps, not int64


@pytest.mark.parametrize("flavour", ["rtx", "trt-10.8"])
def test_trt_backend_refuses_fp16_io_the_manifest_calls_fp32(fake_pairs, flavour):
    """Step engines keep the trajectory in fp32: a plan with fp16 x is refused in one line, nothing allocated."""
    cu = FakeCuda()
    with pytest.raises(BundleError, match=r"has x as float16, the manifest says float32; rebuild"):
        _fake_backend(fake_pairs[flavour], cu=cu, flavour=flavour, dtypes={"x": np.float16})
    assert cu.memory == {}


def test_trt_backend_graph_equals_plain_cached_and_recaptured(fake_pair):
    manifest = read_manifest(fake_pair)
    plain, _, _ = _fake_backend(fake_pair, cuda_graph=False)
    backend, cu, _ = _fake_backend(fake_pair)
    first = _run(backend, manifest, 2, sampler="ddpm")
    assert first.mode == "graph" and cu.captures == 1
    assert len(first.engine_ms) == 8 and all(ms >= 0 for ms in first.engine_ms)  # per-step events in the graph
    assert np.array_equal(first.x, _run(plain, manifest, 2, sampler="ddpm").x)
    allocs = backend.allocations
    second = _run(backend, manifest, 2, sampler="ddpm", seed=1)  # same shapes, new inputs: replay
    assert second.mode == "graph" and cu.captures == 1 and backend.allocations == allocs
    assert np.array_equal(second.x, _run(plain, manifest, 2, sampler="ddpm", seed=1).x)
    old = list(backend._graphs.values())
    third = _run(backend, manifest, 3, sampler="ddpm")  # new batch: new buffers, new capture
    assert cu.captures == 2 and all(g.graph.closed for g in old)
    assert np.array_equal(third.x, _run(plain, manifest, 3, sampler="ddpm").x)
    other = _run(backend, manifest, 3, sampler="ddpm", ratio=1.0)  # another schedule: its own graph
    assert cu.captures == 3 and other.mode == "graph"
    assert np.array_equal(other.x, _run(plain, manifest, 3, sampler="ddpm", ratio=1.0).x)


def test_trt_backend_capture_failure_falls_back_once(fake_pair):
    manifest = read_manifest(fake_pair)
    backend, cu, _ = _fake_backend(fake_pair, cu=FakeCuda(fail_capture=True))
    plain, _, _ = _fake_backend(fake_pair, cuda_graph=False)
    first = _run(backend, manifest, 2)
    assert first.mode == "steps"
    assert len(first.notes) == 1 and "CUDA graph disabled" in first.notes[0]
    second = _run(backend, manifest, 2)
    assert second.mode == "steps" and second.notes == []  # said once
    assert np.array_equal(second.x, _run(plain, manifest, 2).x)


@pytest.mark.parametrize("flavour", ["rtx", "trt-10.8"])
def test_trt_backend_unreadable_graph_events_drop_the_graph(fake_pairs, flavour):
    """Reading a cached graph's per-step events fails: the graph goes WITH its events (a kept graph would
    record destroyed events at its next launch: the fake asserts on that), and the next call recaptures
    without events and stays a graph."""
    bundle = fake_pairs[flavour]
    manifest = read_manifest(bundle)
    backend, cu, _ = _fake_backend(bundle, cu=FakeCuda(unreadable_graph_events=True), flavour=flavour)
    plain, _, _ = _fake_backend(bundle, flavour=flavour, cuda_graph=False)
    first = _run(backend, manifest, 2, sampler="ddpm")
    assert first.mode == "graph" and cu.captures == 1
    assert len(first.notes) == 1 and "events in the graph are unreadable" in first.notes[0]
    assert backend._graphs == {}  # dropped, not kept with closed events
    in_graph = [e for e in cu.events if e.external]
    assert len(in_graph) == 9 and all(e.closed for e in in_graph)
    assert np.array_equal(first.x, _run(plain, manifest, 2, sampler="ddpm").x)
    for seed in (1, 2):  # a new capture without events, then its replay
        res = _run(backend, manifest, 2, sampler="ddpm", seed=seed)
        assert res.mode == "graph" and res.notes == [] and len(res.engine_ms) == 8
        assert np.array_equal(res.x, _run(plain, manifest, 2, sampler="ddpm", seed=seed).x)
    assert cu.captures == 2 and len(backend._graphs) == 1
    assert next(iter(backend._graphs.values())).events == []


def test_trt_backend_not_capturable_falls_back(fake_pair):
    manifest = read_manifest(fake_pair)
    cu = FakeCuda()
    trt = make_fake_trt(cu, ort_step, capturable=False)
    backend = TrtBackend(fake_pair, manifest, kind="trt-rtx", trt_module=trt, cuda=cu)
    res = _run(backend, manifest, 2)
    assert res.mode == "steps" and "not stream-capturable" in res.notes[0] and cu.captures == 0


def test_trt_backend_shares_one_scratch(fake_pair):
    backend, cu, trt = _fake_backend(fake_pair)
    sizes = [len((fake_pair / m.engines["trt-rtx"].file).read_bytes()) // 8 for m in backend.manifest.models]
    _run(backend, backend.manifest, 2)
    rep = backend.memory_report()
    assert rep["contexts"] == 4 and len(trt.contexts) == 4  # two ping-pong contexts per engine
    assert rep["shared_scratch_bytes"] == max(sizes)
    assert rep["one_per_engine_bytes"] == sum(sizes)
    assert rep["saved_vs_one_per_engine_bytes"] == sum(sizes) - max(sizes) > 0
    assert rep["saved_vs_one_per_context_bytes"] == 2 * sum(sizes) - max(sizes)
    assert {ctx.device_memory for ctx in trt.contexts} == {(backend.scratch.ptr, backend.scratch.nbytes)}
    assert all(ctx.enqueues > 0 for ctx in trt.contexts[2:])  # the large model ran on both parities


def test_trt_backend_three_models_and_reuse(tiny_trio, tmp_path):
    bundle = add_fake_engines(tiny_trio, tmp_path / "trio")
    manifest = read_manifest(bundle)
    backend, _, _ = _fake_backend(bundle)
    ref = _run(OrtBackend(bundle, manifest), manifest, 2, ratio=None, fractions=(0.3, 0.3, 0.4), steps=10)
    got = _run(backend, manifest, 2, ratio=None, fractions=(0.3, 0.3, 0.4), steps=10)
    assert got.mode == "graph" and _close(got.x, ref.x)
    allocs = backend.allocations
    _run(backend, manifest, 2, ratio=None, fractions=(0.3, 0.3, 0.4), steps=10, seed=3)
    assert backend.allocations == allocs


def test_trt_backend_oom_frees_everything(fake_pair):
    cu = FakeCuda(memory_limit=1024)  # smaller than the scratch the engines ask for
    with pytest.raises(UserError, match="out of GPU memory"):
        _fake_backend(fake_pair, cu=cu)
    assert cu.memory == {}
    cu = FakeCuda(memory_limit=None)
    backend, cu, _ = _fake_backend(fake_pair, cu=cu)
    cu.memory_limit = sum(m.nbytes for m in cu.memory.values()) + 1024  # room for the scratch, not the tables
    with pytest.raises(UserError, match="out of GPU memory"):
        _run(backend, backend.manifest, 4)
    assert cu.memory == {}
    with pytest.raises(UserError, match="closed"):  # never a launch on freed memory
        _run(backend, backend.manifest, 1)


# -- refusing engines (CPU) -------------------------------------------------------------------------------
def _module(name="tensorrt_rtx", version="1.7.1.116"):
    return SimpleNamespace(__name__=name, __version__=version)


def test_compat_refuses_other_gpu_and_version():
    info = builder_info(_module(), ["8.6"])
    assert info == {"module": "tensorrt_rtx", "version": "1.7.1.116", "compute_capabilities": ["8.6"],
                    "hardware_compatibility": "none", "version_compatible": False}
    check_engine_compat(info, _module(), (8, 6))
    with pytest.raises(UserError, match=r"compute capability 8\.6, but this GPU is 8\.9.*rebuild"):
        check_engine_compat(info, _module(), (8, 9))
    with pytest.raises(UserError, match=r"built with tensorrt_rtx 1\.7\.1\.116, but 1\.8\.0\.1 is installed"):
        check_engine_compat(info, _module(version="1.8.0.1"), (8, 6))
    with pytest.raises(UserError, match="built with tensorrt_rtx, but this backend runs tensorrt"):
        check_engine_compat(info, _module("tensorrt", "10.13.0.35"), (8, 6))
    # relaxations the builder can record
    check_engine_compat({**info, "version_compatible": True}, _module(version="1.9.0"), (8, 6))
    check_engine_compat({**info, "hardware_compatibility": "ampere_plus"}, _module(), (12, 0))
    with pytest.raises(UserError, match="Ampere"):
        check_engine_compat({**info, "hardware_compatibility": "ampere_plus"}, _module(), (7, 5))
    check_engine_compat({}, _module(), (7, 5))  # nothing recorded: left to TensorRT
    assert [cc_string(c) for c in ("SM89", "sm_90", "12.0", (8, 6))] == ["8.9", "9.0", "12.0", "8.6"]


def test_rtx_targets_from_the_module_or_the_fallback():
    from fake_gpu import ComputeCapability

    with_enum = SimpleNamespace(__name__="tensorrt_rtx", __version__="1.7.1.116", ComputeCapability=ComputeCapability)
    assert rtx_targets(with_enum) == ["7.5", "8.0", "8.6", "8.9", "12.0", "12.1"]  # NONE / CURRENT are not GPUs
    assert rtx_targets(_module()) == ["7.5", "8.6", "8.9", "12.x"]  # no enum: the documented list
    assert targets_gpu(["12.x"], (12, 1)) and targets_gpu(["8.9"], (8, 9))
    assert not targets_gpu(["12.x"], (10, 0)) and not targets_gpu(["7.5", "8.6", "8.9", "12.x"], (9, 0))


@pytest.mark.parametrize("cc", [(9, 0), (10, 0)])  # Hopper, data-centre Blackwell: no TensorRT-RTX target
@pytest.mark.parametrize("enum", [True, False])
def test_portable_rtx_plan_refused_on_an_untargeted_gpu(tiny_pair, tmp_path, cc, enum):
    """A trt-rtx bundle built portable (compute_capabilities []) passes the list check anywhere; on a GPU
    TensorRT-RTX does not target it is refused before loading, in one line advising --backend trt."""
    bundle = add_fake_engines(tiny_pair, tmp_path / "b", cc=None)
    manifest = read_manifest(bundle)
    assert manifest.models[0].engines["trt-rtx"].builder["compute_capabilities"] == []
    cu = FakeCuda(cc=cc)
    trt = make_fake_trt(cu, ort_step)
    if not enum:
        del trt.ComputeCapability  # an RTX module without the enum: the fallback list decides
    with pytest.raises(BackendUnavailable) as e:
        TrtBackend(bundle, manifest, kind="trt-rtx", trt_module=trt, cuda=cu)
    msg = str(e.value)
    assert "\n" not in msg and f"compute capability {cc[0]}.{cc[1]}" in msg
    assert "does not target this GPU" in msg and "use --backend trt " in msg and "trt-rtx`" not in msg
    assert cu.memory == {} and trt.contexts == []  # nothing loaded, nothing allocated
    for ok in ((12, 0), (8, 9)):  # the same portable plans where TensorRT-RTX targets the GPU
        cu = FakeCuda(cc=ok)
        backend = TrtBackend(bundle, manifest, kind="trt-rtx", trt_module=make_fake_trt(cu, ort_step), cuda=cu)
        assert _run(backend, manifest, 1).mode == "graph"


@pytest.mark.parametrize("cc,version,match", [
    ("8.6", "1.7.1.116", r"compute capability 8\.6, but this GPU is 8\.9"),
    ("8.9", "1.6.0.0", r"1\.6\.0\.0, but 1\.7\.1\.116 is installed"),
])
def test_backend_refuses_foreign_engine(tiny_pair, tmp_path, cc, version, match):
    bundle = add_fake_engines(tiny_pair, tmp_path / "b", cc=cc, version=version)
    cu = FakeCuda(cc=(8, 9))
    with pytest.raises(UserError, match=match):
        _fake_backend(bundle, cu=cu)
    assert cu.memory == {}  # nothing left allocated


def test_backend_refuses_missing_and_changed_engine(tiny_pair, tmp_path):
    bundle = add_fake_engines(tiny_pair, tmp_path / "b")
    manifest = read_manifest(bundle)
    plan = bundle / manifest.models[1].engines["trt-rtx"].file
    data = plan.read_bytes()
    plan.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(UserError, match="checksum mismatch"):
        _fake_backend(bundle)
    plan.unlink()
    with pytest.raises(UserError, match="is missing"):
        _fake_backend(bundle)


def test_backend_refuses_unloadable_plan(tiny_pair, tmp_path):
    bundle = add_fake_engines(tiny_pair, tmp_path / "b", plans=[b"not a plan", b"not a plan either"])
    with pytest.raises(UserError, match="could not load .*not a plan.*rebuild"):
        _fake_backend(bundle)


def test_backend_needs_engines_for_its_kind(tiny_pair):
    with pytest.raises(UserError, match="no trt-rtx engine"):
        _fake_backend(tiny_pair)


def test_runtime_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import tstitch_trt.runtime.trt_backend, tstitch_trt.runtime.cuda, tstitch_trt.runtime.loop\n"
        "import tstitch_trt.runtime.ort_backend, tstitch_trt.runtime.engine_compat\n"
        "import tstitch_trt.sampling, tstitch_trt.bundle.manifest\n"
        "assert sys.modules['torch'] is None\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_trt_backend_without_gpu_is_a_user_error(fake_pair):
    with pytest.raises(UserError, match="no NVIDIA GPU"):
        _fake_backend(fake_pair, cu=FakeCuda(devices=0))


# -- ONNX Runtime on device buffers --------------------------------------------------------------------------
def test_ort_device_binding_matches_host_binding(fake_pair):
    """The CUDA-EP binding code (row pointers into device tables) run on host OrtValues."""
    manifest = read_manifest(fake_pair)
    host = OrtBackend(fake_pair, manifest)
    dev = OrtDeviceBackend(fake_pair, manifest, providers=["CPUExecutionProvider"], device_type="cpu")
    for sampler in ("ddpm", "dpm-solver++"):
        ref = _run(host, manifest, 2, sampler=sampler)
        got = _run(dev, manifest, 2, sampler=sampler)
        assert np.array_equal(got.x, ref.x)
    allocs = dev.allocations
    _run(dev, manifest, 2, sampler="dpm-solver++", seed=4)
    assert dev.allocations == allocs


@pytest.mark.gpu
@gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in ort_providers(),
                    reason="onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu not installed)")
def test_ort_cuda_matches_cpu(fake_pair):
    manifest = read_manifest(fake_pair)
    cpu = OrtBackend(fake_pair, manifest)
    cuda = OrtDeviceBackend(fake_pair, manifest)
    assert cuda.device.startswith("cuda")
    for sampler in ("ddim", "ddpm"):
        ref = _run(cpu, manifest, 2, sampler=sampler)
        got = _run(cuda, manifest, 2, sampler=sampler)
        assert _close(got.x, ref.x, 2e-2)  # the CUDA EP may use TF32


# -- GPU: runtime/cuda.py ----------------------------------------------------------------------------------
@pytest.mark.gpu
@gpu
def test_cuda_buffers_events_and_graph():
    from tstitch_trt.runtime import cuda

    cuda.require_device(0)
    assert cuda.compute_capability(0) >= (5, 0)
    alloc = cuda.DeviceAllocator()
    s = cuda.Stream()
    a, b = alloc.alloc(4096, "a"), alloc.alloc(4096, "b")
    assert a.ptr % 256 == 0
    host = np.arange(1024, dtype=np.float32)
    a.upload(host, s)
    b.zero(s)
    cuda.copy_device(b.ptr + 2048, a.ptr, 2048, s)
    out = b.download(np.empty(1024, np.float32), s)
    assert np.array_equal(out[:512], np.zeros(512)) and np.array_equal(out[512:], host[:512])
    # a graph replays copies with the addresses, reading the data at replay time
    ev = [cuda.Event() for _ in range(3)]

    def body():
        ev[0].record(s, external=True)
        cuda.copy_device(b.ptr, a.ptr, 4096, s)
        ev[1].record(s, external=True)
        cuda.copy_device(b.ptr, b.ptr + 2048, 2048, s)
        ev[2].record(s, external=True)

    g = cuda.capture_graph(s, body)
    a.upload(host * 2, s)
    g.launch(s)
    s.synchronize()
    out = b.download(np.empty(1024, np.float32), s)
    assert np.array_equal(out[:512], host[512:] * 2) and np.array_equal(out[512:], host[512:] * 2)
    assert ev[0].elapsed_ms(ev[1]) >= 0 and ev[1].elapsed_ms(ev[2]) >= 0  # event nodes time a graph
    g.close()
    # a failed capture leaves the stream usable
    with pytest.raises(RuntimeError):
        cuda.capture_graph(s, lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    a.upload(host, s)
    s.synchronize()
    for e in ev:
        e.close()
    alloc.free_all()
    s.close()


@pytest.mark.gpu
@gpu
def test_cuda_out_of_memory_is_a_user_error():
    from tstitch_trt.runtime import cuda

    cuda.require_device(0)
    alloc = cuda.DeviceAllocator()
    alloc.alloc(1 << 20, "small")
    _, total = cuda.mem_info()
    with pytest.raises(UserError, match="out of GPU memory.*released"):
        alloc.alloc(total * 4, "too much")
    assert alloc.buffers == []
    alloc.alloc(1 << 20, "after")  # the failure is not sticky
    alloc.free_all()


# -- GPU: TrtBackend on the real CUDA layer with a cupy "engine" -------------------------------------------
def _cupy_executor():
    cp = pytest.importorskip("cupy", reason="cupy is needed for the toy GPU engine")
    kernel = cp.ElementwiseKernel(
        "float32 x, float32 prev, float32 noise, int64 t, int64 y, float32 g, raw float32 c, float32 scale",
        "float32 xn, float32 x0",
        """
        float cond = tanhf(scale * x + (float)t * 1e-3f) + (float)y * 1e-2f;
        float unc = tanhf(scale * x);
        float eps = unc + g * (cond - unc);
        float x0v = c[0] * x - c[1] * eps;
        float d = c[2] * x0v + c[3] * prev;
        float sd = c[7] + c[8] * expf(0.5f * c[10]);
        xn = c[4] * x + c[5] * d + c[6] * eps + sd * noise;
        x0 = x0v;
        """, "tstitch_toy_step")

    def view(ptr, shape, dtype):
        n = max(int(np.prod(shape)) * np.dtype(dtype).itemsize, 1)
        mem = cp.cuda.UnownedMemory(ptr, n, None, 0)  # device 0 given: no pointer query inside a capture
        return cp.ndarray(shape, dtype, cp.cuda.MemoryPointer(mem, 0))

    def execute(ctx, shapes, stream_handle):
        a = ctx.addresses
        b = shapes["x"][0]
        with cp.cuda.ExternalStream(stream_handle):  # no allocation: safe inside a stream capture
            kernel(view(a["x"], shapes["x"], np.float32), view(a["prev_x0"], shapes["x"], np.float32),
                   view(a["noise"], shapes["x"], np.float32), view(a["t"], (b, 1, 1, 1), np.int64),
                   view(a["y"], (b, 1, 1, 1), np.int64), view(a["guidance"], (), np.float32),
                   view(a["coef"], shapes["coef"], np.float32), np.float32(ctx.engine.step),
                   view(a["x_next"], shapes["x"], np.float32), view(a["x0"], shapes["x"], np.float32))

    return execute


@pytest.mark.gpu
@gpu
def test_trt_backend_on_real_cuda_graphs(tiny_pair, tmp_path):
    """TrtBackend + runtime/cuda.py on the GPU (real streams, copies, events, graph capture) with toy engines."""
    from tstitch_trt.runtime import cuda

    execute = _cupy_executor()
    manifest = read_manifest(tiny_pair)
    k = 11
    plans = [toy_plan(manifest.latent_shape, k, s) for s in (0.7, 1.3)]
    bundle = add_fake_engines(tiny_pair, tmp_path / "toy", cc=cc_string(cuda.compute_capability(0)), plans=plans)
    manifest = read_manifest(bundle)
    scale_of = lambda data: float(data[3:].split(b",")[4])  # noqa: E731 - the cupy engine's "step" is its scale
    trt = make_fake_trt(FakeCuda(), scale_of, executor=execute)
    ref_cu = FakeCuda()
    ref = TrtBackend(bundle, manifest, kind="trt-rtx", trt_module=make_fake_trt(ref_cu, toy_step_for()),
                     cuda=ref_cu, cuda_graph=False)
    plain = TrtBackend(bundle, manifest, kind="trt-rtx", trt_module=trt, cuda_graph=False)
    graph = TrtBackend(bundle, manifest, kind="trt-rtx", trt_module=trt)
    try:
        for batch, sampler in ((2, "ddpm"), (2, "ddim"), (3, "ddpm")):
            want = _run(ref, manifest, batch, sampler=sampler, steps=12).x
            p = _run(plain, manifest, batch, sampler=sampler, steps=12)
            g = _run(graph, manifest, batch, sampler=sampler, steps=12)
            assert p.mode == "steps" and g.mode == "graph", g.notes
            assert _close(p.x, want, 1e-4) and np.array_equal(g.x, p.x)
            assert len(g.engine_ms) == 12 and sum(g.engine_ms) > 0
        assert len(graph._graphs) == 1  # the batch change dropped the batch-2 graphs
    finally:
        for b in (plain, graph, ref):
            b.close()


# -- GPU: real TensorRT engines ------------------------------------------------------------------------------
TRT_KINDS = ("trt", "trt-rtx")


def trt_kind_skip_reason(kind: str, module, gpu_problem: str | None, cc: tuple[int, int] | None) -> str | None:
    """Why the real-engine test of `kind` cannot run here, or None. Each kind answers for itself: a GPU that
    TensorRT-RTX does not target (Hopper) skips trt-rtx only, a missing tensorrt skips trt only."""
    name = {"trt": "tensorrt", "trt-rtx": "tensorrt_rtx"}[kind]
    if module is None:
        return f"{kind}: {name} is not installed (or only its type stubs)"
    if gpu_problem is not None:
        return f"{kind}: needs an NVIDIA GPU ({gpu_problem})"
    if kind == "trt-rtx" and cc is not None:
        targets = rtx_targets(module)
        if not targets_gpu(targets, cc):
            return (f"trt-rtx: {name} {module.__version__} does not target this GPU (sm_{cc[0]}{cc[1]}; it targets "
                    f"{', '.join(targets)})")
    return None


def test_trt_kind_skip_reasons_are_each_kinds_own():
    from fake_gpu import ComputeCapability

    trt = SimpleNamespace(__name__="tensorrt", __version__="10.13.0.35")
    rtx = SimpleNamespace(__name__="tensorrt_rtx", __version__="1.7.1.116", ComputeCapability=ComputeCapability)
    hopper = {k: trt_kind_skip_reason(k, {"trt": trt, "trt-rtx": rtx}[k], None, (9, 0)) for k in TRT_KINDS}
    assert hopper["trt"] is None  # RTX's missing SM90 never hides the tensorrt test
    assert hopper["trt-rtx"].startswith("trt-rtx: tensorrt_rtx 1.7.1.116 does not target this GPU (sm_90")
    ada = {k: trt_kind_skip_reason(k, {"trt": None, "trt-rtx": rtx}[k], None, (8, 9)) for k in TRT_KINDS}
    assert ada == {"trt": "trt: tensorrt is not installed (or only its type stubs)", "trt-rtx": None}
    none = {k: trt_kind_skip_reason(k, trt, "no NVIDIA GPU is visible", None) for k in TRT_KINDS}
    assert all(v.endswith("needs an NVIDIA GPU (no NVIDIA GPU is visible)") for v in none.values())


@pytest.fixture(scope="module", params=TRT_KINDS)
def trt_pair(request, tmp_path_factory):
    kind = request.param
    from tstitch_trt.runtime import cuda

    module = tensorrt_module(kind)
    problem = None if HAS_GPU else cuda.probe_devices().message
    why = trt_kind_skip_reason(kind, module, problem, cuda.compute_capability(0) if module and HAS_GPU else None)
    if why is not None:
        pytest.skip(why)
    from conftest import build_tiny

    out = build_tiny(tmp_path_factory.mktemp(f"{kind}-") / "pair", ["DiT-S/2", "DiT-B/2"], ["ort", kind],
                     precision="fp32", batch_range=(1, 8))
    return kind, out


@pytest.mark.gpu
def test_real_trt_matches_ort_graph_and_scratch(trt_pair):
    kind, bundle = trt_pair
    manifest = read_manifest(bundle)
    ort_b = OrtBackend(bundle, manifest)
    plain = TrtBackend(bundle, manifest, kind=kind, cuda_graph=False)
    graph = TrtBackend(bundle, manifest, kind=kind)
    try:
        for sampler in ("ddim", "ddpm"):
            ref = _run(ort_b, manifest, 2, sampler=sampler, steps=10)
            p = _run(plain, manifest, 2, sampler=sampler, steps=10)
            g = _run(graph, manifest, 2, sampler=sampler, steps=10)
            assert _close(p.x, ref.x, 2e-2), float(np.max(np.abs(p.x - ref.x)))  # TF32 inside TensorRT
            assert g.mode == "graph", g.notes
            assert _close(g.x, p.x, 1e-5)
        allocs = graph.allocations
        g2 = _run(graph, manifest, 2, sampler="ddpm", steps=10, seed=5)
        assert graph.allocations == allocs and g2.mode == "graph"
        g3 = _run(graph, manifest, 4, sampler="ddpm", steps=10)  # new batch: recapture on new buffers
        assert g3.mode == "graph" and _close(g3.x, _run(plain, manifest, 4, sampler="ddpm", steps=10).x, 1e-5)
        rep = graph.memory_report()
        sizes = list(rep["engines"].values())
        assert rep["shared_scratch_bytes"] >= max(sizes)
        assert rep["saved_vs_one_per_engine_bytes"] == sum(sizes) - rep["shared_scratch_bytes"]
        print(json.dumps(rep))
    finally:
        plain.close()
        graph.close()


# -- GPU: the torch backend's whole-trajectory CUDA graph ----------------------------------------------------
@pytest.mark.gpu
def test_torch_cuda_graph_matches_eager(tiny_pair):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    from tstitch_trt.export.torch_backend import TorchBackend

    manifest = read_manifest(tiny_pair)
    eager = TorchBackend(tiny_pair, manifest, device="cuda", cuda_graph=False)
    graph = TorchBackend(tiny_pair, manifest, device="cuda")
    ref_cpu = TorchBackend(tiny_pair, manifest, device="cpu")
    for batch in (2, 3, 2):
        want = _run(ref_cpu, manifest, batch, sampler="ddpm", steps=10).x
        e = _run(eager, manifest, batch, sampler="ddpm", steps=10)
        g = _run(graph, manifest, batch, sampler="ddpm", steps=10)
        assert g.mode == "graph", g.notes
        assert _close(e.x, want, 2e-2) and _close(g.x, e.x, 1e-4)  # cuDNN convolutions default to TF32



def test_trt_backend_locates_nan_after_a_graph_run(tiny_pair, tmp_path):
    """A NaN from the large engine in graph mode: the loop replays step by step and names step and model."""
    bundle = add_fake_engines(tiny_pair, tmp_path / "b")
    manifest = read_manifest(bundle)
    cu = FakeCuda()

    def nan_step(data: bytes):
        run = ort_step(data)
        large = data == (bundle / manifest.models[1].engines["trt-rtx"].file).read_bytes()

        def step(feeds):
            x_next, x0 = run(feeds)
            if large:
                x_next = x_next.copy()
                x_next.flat[3] = np.nan
            return x_next, x0
        return step

    backend = TrtBackend(bundle, manifest, kind="trt-rtx", trt_module=make_fake_trt(cu, nan_step), cuda=cu)
    plan, x, labels = _plan(manifest, 2)
    first_large = int(np.argmax(plan.step_model == 1))
    with pytest.raises(NonFiniteError, match=rf"first at step {first_large} .* on DiT-B/2"):
        run_stitched(backend, plan, x, labels, 1.5, progress=False, model_names=[m.name for m in manifest.models])


# -- SD bundles: the same TrtBackend binds U-Net step engines by role (context, eps history, saved sample) --
@pytest.fixture(scope="module")
def fake_sd(sd_bundle, tmp_path_factory) -> Path:
    return add_fake_engines(sd_bundle, tmp_path_factory.mktemp("fake-sd") / "sd")


def _sd_plan(manifest, sampler: str, batch: int = 2, ratio: float = 0.4, hw: int = 16, seed: int = 0):
    from tstitch_trt.sampling.sd_samplers import sd_table
    from tstitch_trt.sampling.stitch import stitch_schedule_by_call
    from tstitch_trt.sampling.trajectory import TrajectoryPlan

    table = sd_table(sampler, manifest.scheduler, 6)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 4, hw, hw), dtype=np.float32) * np.float32(table.init_noise_sigma)
    context = rng.standard_normal((2 * batch, 77, 32), dtype=np.float32)
    plan = TrajectoryPlan(sampler, table.timesteps, table.coef,
                          stitch_schedule_by_call(len(table.timesteps), 2, ratio=ratio), None)
    return plan, x, context


@pytest.mark.parametrize("sampler", ["pndm", "dpm-solver++", "euler"])
def test_trt_backend_runs_sd_bundles_like_ort(fake_sd, sampler):
    manifest = read_manifest(fake_sd)
    plan, x, context = _sd_plan(manifest, sampler)
    ref = run_stitched(OrtBackend(fake_sd, manifest), plan, x, context, 7.5, progress=False)
    plain, _, _ = _fake_backend(fake_sd, cuda_graph=False)
    got = run_stitched(plain, plan, x, context, 7.5, progress=False)
    assert got.mode == "steps" and _close(got.x, ref.x) and np.abs(ref.x).max() > 0.1
    graph, cu, _ = _fake_backend(fake_sd)
    first = run_stitched(graph, plan, x, context, 7.5, progress=False)
    assert first.mode == "graph" and cu.captures == 1 and np.array_equal(first.x, got.x)
    # the eps history and saved sample are state: a replay restarts them, so a second run is identical
    again = run_stitched(graph, plan, x, context, 7.5, progress=False)
    assert again.mode == "graph" and cu.captures == 1 and np.array_equal(again.x, got.x)


def test_trt_backend_sd_new_size_recaptures(fake_sd):
    manifest = read_manifest(fake_sd)
    backend, cu, _ = _fake_backend(fake_sd)
    plan, x, context = _sd_plan(manifest, "pndm")
    run_stitched(backend, plan, x, context, 7.5, progress=False)
    plan2, x2, context2 = _sd_plan(manifest, "pndm", hw=8, batch=1)  # another latent size: new buffers and graph
    got = run_stitched(backend, plan2, x2, context2, 7.5, progress=False)
    ref = run_stitched(OrtBackend(fake_sd, manifest), plan2, x2, context2, 7.5, progress=False)
    assert cu.captures == 2 and got.x.shape == (1, 4, 8, 8) and _close(got.x, ref.x)


@pytest.mark.parametrize("flavour,typed", [("rtx", False), ("trt-10.8", True)])
def test_sd_pipeline_on_fake_trt_equals_ort(fake_sd, tmp_path, monkeypatch, flavour, typed):
    """The whole SD request on (fake) TensorRT: text-encoder engine once, U-Net step engines in one graph,
    VAE engine; the image equals the ORT pipeline's. `typed`: the plans carry int32 token ids and
    fp16 text-encoder and VAE outputs (what fp16 engines built from fp16 graphs give), which the runtime
    converts (TrtEngineRunner's casts)."""
    import tstitch_trt.runtime.trt_engine as trt_engine
    from tstitch_trt.pipeline.sd import StitchedSDPipeline

    kind = KIND_OF[flavour]
    bundle = tmp_path / "sd-all-engines"
    if kind == "trt-rtx":
        shutil.copytree(fake_sd, bundle)
    else:
        add_fake_engines(fake_sd, bundle, flavour=flavour)
    manifest = read_manifest(bundle)
    for part in (manifest.text_encoder, manifest.vae):
        ort_entry = part["engines"]["ort"]
        part["engines"][kind] = EngineEntry(file=ort_entry.file, sha256=ort_entry.sha256, precision="fp32",
                                            builder=manifest.models[0].engines[kind].builder)
    (bundle / "manifest.json").write_text(manifest.to_json())
    manifest = read_manifest(bundle)
    dtypes = None
    if typed:
        dtypes = {"input_ids": np.int32, "image": np.float16,
                  **{n: np.float16 for n in manifest.text_encoder["io"]["outputs"]}}
    backend, cu, trt = _fake_backend(bundle, flavour=flavour, dtypes=dtypes)
    monkeypatch.setattr(trt_engine, "import_tensorrt", lambda kind: trt)
    monkeypatch.setattr(trt_engine, "cuda_rt", cu)
    init = np.random.default_rng(0).standard_normal((2, 4, 16, 16), dtype=np.float32)
    fake = StitchedSDPipeline(bundle, manifest, backend, f"fake {kind}")
    got = fake(prompt="a red cube", steps=6, init_noise=init, progress=False)
    ref = StitchedSDPipeline.from_bundle(fake_sd, backend="ort")(prompt="a red cube", steps=6, init_noise=init,
                                                                  progress=False)
    assert got.report["loop_mode"] == "graph" and got.report["backend"] == kind
    # fp16 text embeddings move the latents by ~1e-3 of their scale; fp32 engines agree to float rounding
    assert _close(got.latents, ref.latents, 1e-2 if typed else 1e-4) and np.abs(ref.latents).max() > 0.1
    if typed:
        assert not _close(got.latents, ref.latents, 1e-7)  # the fp16 outputs really were fp16
    assert np.abs(got.images.astype(int) - ref.images.astype(int)).max() <= (2 if typed else 1)
    runs = {tuple(c.engine.inputs): c.enqueues for c in trt.contexts if c.enqueues}
    assert runs[("input_ids",)] == 1 and runs[("latent",)] == 1  # text encoder once per request (both halves)
    if typed:
        te = next(c.engine for c in trt.contexts if c.engine.inputs == ["input_ids"])
        vae = next(c.engine for c in trt.contexts if c.engine.inputs == ["latent"])
        assert te.get_tensor_dtype("input_ids") == trt.DataType.INT32
        assert {te.get_tensor_dtype(n) for n in te.outputs} == {vae.get_tensor_dtype("image")} == {trt.DataType.HALF}
