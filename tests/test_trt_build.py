"""Engine builders (export/trt_build.py): real TensorRT-RTX engines built on the CPU, clear errors.

TensorRT-RTX builds ahead of time without a GPU, so these build REAL plans here; running them
needs a GPU (tests/test_check or the runtime's GPU tests). `tensorrt` proper needs a GPU to build.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import onnx
import pytest

from tstitch_trt.bundle.manifest import artifact_path, read_manifest
from tstitch_trt.errors import UserError
from tstitch_trt.export.build import BuildConfig, ModelSpec, build_bundle
from tstitch_trt.export.onnx_export import export_step_graph, io_spec
from tstitch_trt.export.step_module import StepModule
from tstitch_trt.export.trt_build import EngineBuilder, make_engine_builder
from tstitch_trt.models.dit import dit_config, randomized_dit
from tstitch_trt.runtime.trt_backend import import_tensorrt


def _has_rtx() -> bool:
    try:
        return hasattr(importlib.import_module("tensorrt_rtx"), "Builder")
    except Exception:
        return False


needs_rtx = pytest.mark.skipif(not _has_rtx(), reason="tensorrt_rtx is not installed (pip install tensorrt-rtx)")
TINY = {"DiT-S/2": {"depth": 2, "hidden_size": 64, "num_heads": 2},
        "DiT-B/2": {"depth": 3, "hidden_size": 96, "num_heads": 2}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[StepModule, Path]:
    cfg = dataclasses.replace(dit_config("DiT-S/2", input_size=8, num_classes=10), **TINY["DiT-S/2"])
    step = StepModule(randomized_dit(cfg, seed=3)).eval()
    return step, export_step_graph(step, tmp_path_factory.mktemp("g") / "s-fp16.onnx", "fp16")


@needs_rtx
def test_trt_rtx_builds_real_engines_for_a_pair_on_cpu(tmp_path):
    from tstitch_trt.export.vae_export import randomized_vae

    randomized_vae((32, 64), seed=0).save_pretrained(str(tmp_path / "vae"))
    out = tmp_path / "pair"
    cfg = BuildConfig(models=[ModelSpec("DiT-S/2", "random:1"), ModelSpec("DiT-B/2", "random:2")], out=out,
                      backends=["trt-rtx"], image_size=64, num_classes=10, batch_range=(1, 4), precision="fp16",
                      arch_overrides=TINY, vae=str(tmp_path / "vae"))
    build_bundle(cfg)
    m = read_manifest(out)
    assert m.vae is not None
    vae = m.vae["engines"]["trt-rtx"]
    assert artifact_path(out, vae).stat().st_size > 10_000 and vae.precision == "fp16"  # PSNR ~72 dB > 40
    assert vae.builder["options"]["profile"]["latent"] == [[1, 4, 8, 8], [4, 4, 8, 8], [4, 4, 8, 8]]
    assert "PSNR" in m.vae["notes"][0] and set(m.vae["engines"]) == {"trt-rtx"}
    assert m.backends() == ["trt-rtx"]
    rtx = importlib.import_module("tensorrt_rtx")
    for model in m.models:
        e = model.engines["trt-rtx"]
        plan = artifact_path(out, e)  # exists, checksum matches
        assert e.precision == "fp16" and e.batch_range == (1, 4)
        assert e.builder["module"] == "tensorrt_rtx" and e.builder["version"] == rtx.__version__
        assert e.builder["plan_bytes"] == plan.stat().st_size > 100_000
        assert e.builder["options"]["strongly_typed"] is True
        assert e.builder["options"]["profile"]["x"] == [[1, 4, 8, 8], [4, 4, 8, 8], [4, 4, 8, 8]]
        assert set(e.builder["options"]["profile"]) == {"x", "t", "y", "prev_x0", "noise"}  # guidance, coef static
        # a plan starts with TensorRT's serialized-engine header, not ONNX or zeros
        assert plan.read_bytes()[:4] != b"\0\0\0\0"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "trt", "vae"]  # ONNX graphs not kept
    assert sorted(p.name for p in (out / "vae").iterdir()) == ["decoder-trt-rtx-fp16.plan"]


@needs_rtx
def test_trt_rtx_records_targets_and_ignores_timing_cache(tiny, tmp_path):
    step, graph = tiny
    b = make_engine_builder("trt-rtx", opt_level=1, timing_cache=str(tmp_path / "tc.bin"),
                            compute_capabilities=["8.9", "SM120"])
    info = b.build(graph, tmp_path / "s.plan", (2, 16), io_spec(step))
    assert info["compute_capabilities"] == ["12.0", "8.9"] and info["targets"] == ["SM89", "SM120"]
    assert info["options"]["builder_optimization_level"] == 1
    assert info["options"]["timing_cache"] is None and not (tmp_path / "tc.bin").exists()  # a no-op in RTX
    assert info["options"]["profile"]["t"] == [[2], [8], [16]]
    with pytest.raises(UserError, match="SM99 is not a tensorrt_rtx target"):
        make_engine_builder("trt-rtx", compute_capabilities=["9.9"]).build(graph, tmp_path / "x.plan", (1, 2),
                                                                          io_spec(step))


@needs_rtx
def test_parser_errors_name_the_node(tiny, tmp_path):
    step, graph = tiny
    model = onnx.load(str(graph))
    node = next(n for n in model.graph.node if n.op_type == "Softmax")
    node.op_type = "SoftmaxTypo"
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    b = make_engine_builder("trt-rtx")
    with pytest.raises(UserError) as err:
        b.build(bad, tmp_path / "bad.plan", (1, 2), io_spec(step))
    msg = str(err.value)
    assert node.name in msg and "SoftmaxTypo" in msg and "\n" not in msg
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    with pytest.raises(UserError, match="corrupt or not ONNX"):
        b.build(truncated, tmp_path / "t.plan", (1, 2), io_spec(step))
    assert not (tmp_path / "bad.plan").exists() and not (tmp_path / "t.plan").exists()


@needs_rtx
def test_builder_rejects_bad_options(tiny, tmp_path):
    step, graph = tiny
    with pytest.raises(UserError, match="opt-level must be 0..5"):
        make_engine_builder("trt-rtx", opt_level=7)
    with pytest.raises(UserError, match="1 <= MIN <= MAX"):
        make_engine_builder("trt-rtx").build(graph, tmp_path / "p.plan", (4, 2), io_spec(step))


def test_trt_without_tensorrt_or_gpu_is_one_clear_line():
    try:
        import_tensorrt("trt")
    except UserError:
        pass
    else:
        from tstitch_trt.export.trt_build import cuda_gpu

        if cuda_gpu() is not None:
            pytest.skip("real TensorRT and a GPU are present: building for trt works here")
    with pytest.raises(UserError) as err:
        make_engine_builder("trt")
    msg = str(err.value)
    assert "\n" not in msg and "--backend trt-rtx" in msg and "ort" in msg
    assert "TensorRT" in msg or "GPU" in msg


def test_stub_namespace_is_not_mistaken_for_tensorrt(monkeypatch):
    import types

    empty = types.ModuleType("tensorrt")  # what tensorrt-stubs leaves importable
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", empty)
    with pytest.raises(UserError, match="tensorrt module is not usable here"):
        import_tensorrt("trt")


def test_old_tensorrt_is_refused(monkeypatch):
    import types

    old = types.ModuleType("tensorrt")
    old.Builder, old.__version__ = object, "10.3.0"
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", old)
    with pytest.raises(UserError, match="needs TensorRT >= 10.8.*found 10.3.0"):
        import_tensorrt("trt")


def test_trt_kind_cannot_take_rtx_targets():
    import types

    fake = types.ModuleType("tensorrt")
    b = EngineBuilder("trt", fake, compute_capabilities=["8.9"])
    with pytest.raises(UserError, match="trt-rtx option"):
        b._set_targets(config=None)  # type: ignore[arg-type]


@needs_rtx
def test_cli_recipe_with_target_flag_records_compute_capability(tmp_path, capsys):
    from tstitch_trt.cli import main

    recipe = tmp_path / "tiny.toml"
    recipe.write_text(
        'image_size = 64\nnum_classes = 10\nbackend = "trt-rtx"\nprecision = "fp16"\nbatch_sizes = "1-2"\n'
        '[arch_overrides]\n"DiT-S/2" = { depth = 2, hidden_size = 64, num_heads = 2 }\n'
        '"DiT-B/2" = { depth = 3, hidden_size = 96, num_heads = 2 }\n'
        '[[models]]\narch = "DiT-S/2"\ncheckpoint = "random:1"\n'
        '[[models]]\narch = "DiT-B/2"\ncheckpoint = "random:2"\n'
    )
    out = tmp_path / "b"
    assert main(["build", "--recipe", str(recipe), "--compute-capabilities", "8.9", "--out", str(out)]) == 0
    m = read_manifest(out)
    assert [e.engines["trt-rtx"].builder["compute_capabilities"] for e in m.models] == [["8.9"], ["8.9"]]
    assert m.models[0].engines["trt-rtx"].batch_range == (1, 2)
    assert main(["build", "--recipe", str(recipe), "--compute-capabilities", "eight", "--out", str(out)]) == 2
    assert "compute capabilities look like 8.9" in capsys.readouterr().err


@needs_rtx
@pytest.mark.parametrize("streamed", [False, True], ids=["inline", "external-data"])
def test_trt_rtx_builds_the_sd_pair_on_cpu(sd_pair, tmp_path, monkeypatch, streamed):
    """The tiny SD pair: fp16-typed text encoder, U-Net step graphs and VAE become real TensorRT-RTX plans.
    external-data: every source graph written as real sizes write theirs (weights in .onnx.data, the parser
    reading them from the graph's path) builds the same plans."""
    from tstitch_trt.export import onnx_export
    from tstitch_trt.export.sd_build import SdBuildConfig, build_sd_bundle

    if streamed:
        monkeypatch.setattr(onnx_export, "STREAM_ABOVE", 0)
    out = tmp_path / "sd-rtx"
    build_sd_bundle(SdBuildConfig(models=[str(p) for p in sd_pair], out=out, backends=["trt-rtx"],
                                  precision="fp16", batch_range=(1, 2)))
    m = read_manifest(out)
    assert m.pipeline == "sd" and m.backends() == ["trt-rtx"]
    te = m.text_encoder["engines"]["trt-rtx"]
    assert te.precision == "fp16" and artifact_path(out, te).stat().st_size > 10_000
    assert te.builder["options"]["profile"]["input_ids"] == [[2, 77], [2, 77], [4, 77]]
    for model in m.models:
        e = model.engines["trt-rtx"]
        assert e.precision == "fp16" and artifact_path(out, e).stat().st_size > 10_000
        profile = e.builder["options"]["profile"]
        assert profile["x"] == [[1, 4, 16, 16], [2, 4, 32, 32], [2, 4, 64, 64]]  # B 1-2, H/W 16..64 around 32
        assert profile["context"] == [[2, 77, 32], [4, 77, 32], [4, 77, 32]]
        assert profile["eps_hist"][2] == [2, 3, 4, 64, 64]
    vae = m.vae["engines"]["trt-rtx"]
    assert artifact_path(out, vae).stat().st_size > 10_000
    assert vae.builder["options"]["profile"]["latent"][0] == [1, 4, 16, 16]
    assert not any(out.glob("**/*.onnx")) and not any(out.glob("**/*.data"))  # the graphs were only the source


@pytest.mark.slow  # ~50 s on 2 cores: five real TensorRT-RTX builds (the two ControlNet step graphs are 3/4 of it)
@needs_rtx
def test_trt_rtx_builds_the_controlnet_step_graphs_on_cpu(control_set, tmp_path):
    """The tiny SD pair with the tiny ControlNet: the fp16-typed step graphs (ControlNet inside) become real
    TensorRT-RTX plans, with the control image's profile at the VAE's pixel size (2H x 2W here)."""
    from tstitch_trt.export.sd_build import SdBuildConfig, build_sd_bundle

    small, large, net = control_set
    out = tmp_path / "sd-control-rtx"
    build_sd_bundle(SdBuildConfig(models=[str(small), str(large)], out=out, backends=["trt-rtx"], precision="fp16",
                                  batch_range=(1, 2), controlnet=str(net)))
    m = read_manifest(out)
    assert m.backends() == ["trt-rtx"]
    assert m.controlnet == {"source": str(net), "family": "sd", "conditioning_channels": 3, "engines": {}}
    assert m.io["roles"]["step"][-1] == "control_scale" and "control_image" in m.io["roles"]["request"]
    for model in m.models:
        e = model.engines["trt-rtx"]
        assert e.precision == "fp16" and artifact_path(out, e).stat().st_size > 10_000
        profile = e.builder["options"]["profile"]
        assert profile["x"] == [[1, 4, 16, 16], [2, 4, 32, 32], [2, 4, 64, 64]]
        assert profile["control_image"] == [[1, 3, 32, 32], [2, 3, 64, 64], [2, 3, 128, 128]]
        assert "control_scale" not in profile and "control_guess" not in profile  # scalars: static
    assert not any(out.glob("**/*.onnx")) and not (out / "controlnet").exists()  # inside the plans only


@pytest.mark.slow  # ~60 s on 2 cores: five real TensorRT-RTX builds (the large U-Net step graph is half of it)
@needs_rtx
def test_trt_rtx_builds_the_sdxl_pair_on_cpu(sdxl_pair, tmp_path):
    """The tiny SDXL pair: both fp16-typed text encoders (text_encoder_2 with its pooled output), the U-Net step
    graphs with text_embeds / time_ids, and the VAE (fp16 after the PSNR probe at 1 / scaling_factor) become
    real TensorRT-RTX plans."""
    from tstitch_trt.export.sd_build import SdBuildConfig, build_sd_bundle

    out = tmp_path / "sdxl-rtx"
    m = build_sd_bundle(SdBuildConfig(models=[str(p) for p in sdxl_pair], out=out, backends=["trt-rtx"],
                                      precision="fp16", batch_range=(1, 2)))
    print(f"\nSDXL tiny pair, TensorRT-RTX fp16 build seconds: {m.io['build_seconds']}")
    m = read_manifest(out)
    assert m.pipeline == "sdxl" and m.backends() == ["trt-rtx"]
    for te in (m.text_encoder, m.text_encoder_2):
        e = te["engines"]["trt-rtx"]
        assert e.precision == "fp16" and artifact_path(out, e).stat().st_size > 10_000
        assert e.builder["options"]["profile"]["input_ids"] == [[2, 77], [2, 77], [4, 77]]
    assert list(m.text_encoder_2["io"]["outputs"]) == ["text_embeddings", "text_embeds"]
    for model in m.models:
        e = model.engines["trt-rtx"]
        assert e.precision == "fp16" and artifact_path(out, e).stat().st_size > 10_000
        profile = e.builder["options"]["profile"]
        assert profile["context"] == [[2, 77, 64], [4, 77, 64], [4, 77, 64]]
        assert profile["text_embeds"] == [[2, 32], [4, 32], [4, 32]]
        assert profile["time_ids"] == [[2, 6], [4, 6], [4, 6]]
    vae = m.vae["engines"]["trt-rtx"]
    assert vae.precision == "fp16" and artifact_path(out, vae).stat().st_size > 10_000
    assert "x 7.678" in m.vae["notes"][0] and "VAE engines are fp16" in m.vae["notes"][0]
    assert not any(out.glob("**/*.onnx"))


@needs_rtx
def test_trt_rtx_builds_an_sdxl_controlnet_step_graph_on_cpu(sdxl_control_set, tmp_path):
    """The tiny SDXL small U-Net with the tiny SDXL ControlNet (text_embeds / time_ids reach both): its fp16-typed
    step graph becomes a real TensorRT-RTX plan (the SD pair's bundle build above covers the rest of the path)."""
    from tstitch_trt.export.unet_export import export_unet_step, unet_io_spec
    from tstitch_trt.export.unet_step import UNetStepModule
    from tstitch_trt.models.controlnet import load_controlnet
    from tstitch_trt.models.sd import load_unet

    small, _, net = sdxl_control_set
    step = UNetStepModule(load_unet(small), load_controlnet(net)).eval()
    graph = export_unet_step(step, tmp_path / "step-fp16.onnx", "fp16", 77, pixel_factor=2)
    io = unet_io_spec(step, 77, pixel_factor=2)
    info = make_engine_builder("trt-rtx").build(graph, tmp_path / "step.plan", (1, 2), io)
    assert (tmp_path / "step.plan").stat().st_size == info["plan_bytes"] > 10_000
    profile = info["options"]["profile"]
    assert profile["control_image"] == [[1, 3, 32, 32], [2, 3, 64, 64], [2, 3, 128, 128]]
    assert profile["text_embeds"] == [[2, 32], [4, 32], [4, 32]] and profile["time_ids"] == [[2, 6], [4, 6], [4, 6]]


def test_fp16_step_graph_is_traced_small_and_holds_at_full_size(sd_pair, tmp_path, monkeypatch):
    """The engines' fp16 step graph is traced at trace_size (fp16 on a CPU is ~1000x slower than fp32: the real SD
    1.5 pair's trace at 64x64 did not finish in 17 minutes), and since H and W are symbolic, it computes the same
    step at the U-Net's own size: ORT (CPU) runs it there against the fp32 torch step, within check's fp16 bound."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from tstitch_trt.export.unet_export import UNET_STEP_OUTPUTS, example_unet_inputs, export_unet_step, trace_size
    from tstitch_trt.export.unet_step import UNetStepModule
    from tstitch_trt.models.sd import load_unet

    step = UNetStepModule(load_unet(sd_pair[1] / "unet")).eval()
    traced: list[tuple[int, ...]] = []
    real = torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", lambda m, args, *a, **k: traced.append(tuple(args[0].shape))
                        or real(m, args, *a, **k))
    graph = export_unet_step(step, tmp_path / "step-fp16.onnx", "fp16", 77)
    small, full = trace_size(step), step.sample_size
    assert small < full and traced[0][-2:] == (small, small)
    inputs = example_unet_inputs(step, 77)
    assert inputs[0].shape[-1] == full
    with torch.no_grad():
        want = [o.numpy() for o in step(*inputs)]
    sess = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    got = sess.run(list(UNET_STEP_OUTPUTS), {n: t.numpy() for n, t in zip(step.conditions.inputs, inputs,
                                                                           strict=True)})
    for name, g, w in zip(UNET_STEP_OUTPUTS, got, want, strict=True):
        assert g.shape == w.shape, name
        assert np.abs(g - w).max() <= 3e-2 * np.abs(w).max() + 1e-6, name
