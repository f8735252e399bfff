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

from fake_gpu import FakeCuda, make_fake_trt, ort_step, toy_plan, toy_step_for
from tstitch_trt.bundle.manifest import EngineEntry, read_manifest, sha256_file
from tstitch_trt.errors import UserError
from tstitch_trt.pipeline.backends import tensorrt_module
from tstitch_trt.runtime.cuda import device_count as cuda_device_count
from tstitch_trt.runtime.engine_compat import builder_info, cc_string, check_engine_compat
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


def add_fake_engines(src: Path, dst: Path, cc: str = "8.9", version: str = "1.7.1.116",
                     module: str = "tensorrt_rtx", plans: list[bytes] | None = None) -> Path:
    """Copy a bundle and give each model a "trt-rtx" engine: its fp32 ONNX graph (or `plans`)."""
    shutil.copytree(src, dst)
    manifest = read_manifest(dst)
    info = builder_info(SimpleNamespace(__name__=module, __version__=version), [cc])
    for i, m in enumerate(manifest.models):
        rel = m.engines["ort"].file if plans is None else f"trt/{i}.plan"
        if plans is not None:
            (dst / "trt").mkdir(exist_ok=True)
            (dst / rel).write_bytes(plans[i])
        m.engines["trt-rtx"] = EngineEntry(file=rel, sha256=sha256_file(dst / rel), precision="fp32",
                                           batch_range=(1, 16), builder=info)
    (dst / "manifest.json").write_text(manifest.to_json())
    return dst


@pytest.fixture(scope="module")
def fake_pair(tiny_pair, tmp_path_factory) -> Path:
    return add_fake_engines(tiny_pair, tmp_path_factory.mktemp("fake") / "pair")


def _fake_backend(bundle: Path, cu: FakeCuda | None = None, **kw):
    cu = cu or FakeCuda()
    trt = make_fake_trt(cu, ort_step, scratch_for=lambda data: len(data) // 8)
    return TrtBackend(bundle, read_manifest(bundle), kind="trt-rtx", trt_module=trt, cuda=cu, **kw), cu, trt


# -- TrtBackend logic on fakes (CPU) -----------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm-solver++"])
def test_trt_backend_matches_ort(fake_pair, sampler):
    manifest = read_manifest(fake_pair)
    ort_b = OrtBackend(fake_pair, manifest)
    trt_b, _, _ = _fake_backend(fake_pair, cuda_graph=False)
    ref = _run(ort_b, manifest, 2, sampler=sampler)
    got = _run(trt_b, manifest, 2, sampler=sampler)
    assert got.mode == "steps" and len(got.engine_ms) == 8
    assert _close(got.x, ref.x), float(np.max(np.abs(got.x - ref.x)))
    assert np.abs(ref.x).max() > 0.1  # not a comparison of zeros


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
    with pytest.raises(UserError, match=r"compute capability 8\.6, but this GPU is 9\.0.*rebuild"):
        check_engine_compat(info, _module(), (9, 0))
    with pytest.raises(UserError, match=r"built with tensorrt_rtx 1\.7\.1\.116, but 1\.8\.0\.1 is installed"):
        check_engine_compat(info, _module(version="1.8.0.1"), (8, 6))
    with pytest.raises(UserError, match="built with tensorrt_rtx, but this backend runs tensorrt"):
        check_engine_compat(info, _module("tensorrt", "10.13.0.35"), (8, 6))
    # relaxations the builder can record
    check_engine_compat({**info, "version_compatible": True}, _module(version="1.9.0"), (8, 6))
    check_engine_compat({**info, "hardware_compatibility": "ampere_plus"}, _module(), (9, 0))
    with pytest.raises(UserError, match="Ampere"):
        check_engine_compat({**info, "hardware_compatibility": "ampere_plus"}, _module(), (7, 5))
    check_engine_compat({}, _module(), (7, 5))  # nothing recorded: left to TensorRT
    assert [cc_string(c) for c in ("SM89", "sm_90", "12.0", (8, 6))] == ["8.9", "9.0", "12.0", "8.6"]


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
def _trt_kind():
    for kind in ("trt-rtx", "trt"):
        if tensorrt_module(kind) is not None:
            return kind
    return None


@pytest.fixture(scope="module")
def trt_pair(tmp_path_factory):
    kind = _trt_kind()
    if not HAS_GPU or kind is None:
        pytest.skip("needs an NVIDIA GPU and tensorrt or tensorrt_rtx")
    from conftest import build_tiny
    from tstitch_trt.runtime import cuda

    major, minor = cuda.compute_capability(0)
    targets = getattr(tensorrt_module(kind), "ComputeCapability", None)
    if kind == "trt-rtx" and targets is not None and not hasattr(targets, f"SM{major}{minor}"):
        pytest.skip(f"TensorRT-RTX has no target for this GPU (sm_{major}{minor}; it knows "
                    f"{', '.join(k for k in targets.__members__ if k.startswith('SM'))})")
    out = build_tiny(tmp_path_factory.mktemp("trt") / "pair", ["DiT-S/2", "DiT-B/2"], ["ort", kind],
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


def test_sd_pipeline_on_fake_trt_equals_ort(fake_sd, tmp_path, monkeypatch):
    """The whole SD request on (fake) TensorRT: text-encoder engine once, U-Net step engines in one graph,
    VAE engine; the image equals the ORT pipeline's."""
    import tstitch_trt.runtime.trt_engine as trt_engine
    from tstitch_trt.pipeline.sd import StitchedSDPipeline

    bundle = tmp_path / "sd-all-engines"
    shutil.copytree(fake_sd, bundle)
    manifest = read_manifest(bundle)
    for part in (manifest.text_encoder, manifest.vae):
        ort_entry = part["engines"]["ort"]
        part["engines"]["trt-rtx"] = EngineEntry(file=ort_entry.file, sha256=ort_entry.sha256, precision="fp32",
                                                 builder=manifest.models[0].engines["trt-rtx"].builder)
    (bundle / "manifest.json").write_text(manifest.to_json())
    manifest = read_manifest(bundle)
    backend, cu, trt = _fake_backend(bundle)
    monkeypatch.setattr(trt_engine, "import_tensorrt", lambda kind: trt)
    monkeypatch.setattr(trt_engine, "cuda_rt", cu)
    init = np.random.default_rng(0).standard_normal((2, 4, 16, 16), dtype=np.float32)
    fake = StitchedSDPipeline(bundle, manifest, backend, "fake trt-rtx")
    got = fake(prompt="a red cube", steps=6, init_noise=init, progress=False)
    ref = StitchedSDPipeline.from_bundle(fake_sd, backend="ort")(prompt="a red cube", steps=6, init_noise=init,
                                                                  progress=False)
    assert got.report["loop_mode"] == "graph" and got.report["backend"] == "trt-rtx"
    assert _close(got.latents, ref.latents) and np.abs(ref.latents).max() > 0.1
    assert np.abs(got.images.astype(int) - ref.images.astype(int)).max() <= 1
    runs = {tuple(c.engine.inputs): c.enqueues for c in trt.contexts if c.enqueues}
    assert runs[("input_ids",)] == 1 and runs[("latent",)] == 1  # text encoder once per request (both halves)
