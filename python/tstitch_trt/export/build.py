"""`tstitch-trt build`: checkpoints -> a bundle of step artifacts for the requested backends."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tstitch_trt import __version__
from tstitch_trt.bundle.manifest import EngineEntry, Manifest, ModelEntry, add_file, write_manifest
from tstitch_trt.bundle.staging import staged_bundle
from tstitch_trt.errors import UserError
from tstitch_trt.export.fora import FORA_INPUT, FORA_OUTPUT, feature_spec, fora_graph_io
from tstitch_trt.export.onnx_export import export_step_graph, io_spec
from tstitch_trt.export.step_module import StepModule
from tstitch_trt.export.torch_dirs import save_dit_file
from tstitch_trt.models.checkpoints import load_dit
from tstitch_trt.models.dit import DiT, DiTConfig, dit_config, randomized_dit

log = logging.getLogger("tstitch_trt.build")
BUILD_BACKENDS = ("torch", "ort", "trt", "trt-rtx")
DIT_CACHE_SCHEMES = ("fora",)  # build --cache-scheme: FORA's full + cached step graphs (export/fora.py)


@dataclass
class ModelSpec:
    arch: str  # "DiT-S/2"
    checkpoint: str  # a path, or "random:SEED" for randomized weights (tests, timing)


@dataclass
class BuildConfig:
    models: list[ModelSpec]
    out: Path
    backends: list[str] = field(default_factory=lambda: ["torch", "ort"])
    image_size: int = 256
    num_classes: int = 1000
    latent_channels: int = 4
    downsample: int = 8  # VAE factor; 1 for pixel-space models
    latent_scale_factor: float = 0.18215
    vae: str | None = None
    precision: str = "fp16"  # engines (trt, trt-rtx); ort is always fp32
    batch_range: tuple[int, int] = (1, 16)
    guidance_channels: int = 3
    opt_level: int = 3
    timing_cache: str | None = None
    compute_capabilities: tuple[str, ...] = ()  # TensorRT-RTX target GPUs ("8.9"); () = its portable default
    arch_overrides: dict = field(default_factory=dict)  # DiTConfig fields (e.g. depth) for custom pairs
    cache_scheme: str | None = None  # "fora": also write each model's FORA cached step graph (export/fora.py)


def check_config(cfg: BuildConfig) -> None:
    """Ranges of the numeric settings, whether they came from flags or a recipe."""
    limits = {"image_size": (8, 16384), "num_classes": (1, 1_000_000), "latent_channels": (1, 1024),
              "downsample": (1, 64), "opt_level": (0, 5), "guidance_channels": (1, 1024)}
    for name, (lo, hi) in limits.items():
        v = getattr(cfg, name)
        if not lo <= v <= hi:
            raise UserError(f"{name.replace('_', '-')} must be between {lo} and {hi}, got {v}")
    lo, hi = cfg.batch_range
    if not 1 <= lo <= hi <= 65536:
        raise UserError(f"batch sizes must satisfy 1 <= MIN <= MAX <= 65536, got {lo}-{hi}")


def model_config(spec: ModelSpec, cfg: BuildConfig) -> DiTConfig:
    if cfg.image_size % cfg.downsample:
        raise UserError(f"--image-size {cfg.image_size} is not a multiple of the VAE factor {cfg.downsample}")
    try:
        config = dit_config(spec.arch, input_size=cfg.image_size // cfg.downsample, in_channels=cfg.latent_channels,
                            num_classes=cfg.num_classes, **cfg.arch_overrides.get(spec.arch, {}))
    except ValueError as e:
        raise UserError(str(e)) from None
    except TypeError as e:  # an arch_overrides field DiTConfig does not have
        raise UserError(f"{spec.arch}: {e}") from None
    if config.input_size % config.patch_size:
        raise UserError(f"{spec.arch}: the latent is {config.input_size} px wide (image {cfg.image_size} / VAE factor "
                        f"{cfg.downsample}), not a multiple of the patch size {config.patch_size}; choose an image "
                        f"size that is a multiple of {cfg.downsample * config.patch_size}")
    if config.hidden_size % config.num_heads or min(config.depth, config.hidden_size, config.num_heads) < 1:
        raise UserError(f"{spec.arch}: depth, hidden size and heads must be positive and hidden size a multiple of "
                        f"the heads (got {config.depth}, {config.hidden_size}, {config.num_heads})")
    return config


@contextmanager
def _no_progress(name: str) -> Iterator[None]:
    yield


def load_model(spec: ModelSpec, config: DiTConfig) -> DiT:
    if spec.checkpoint.startswith("random"):
        _, _, seed = spec.checkpoint.partition(":")
        return randomized_dit(config, seed=int(seed or 0))
    return load_dit(config, spec.checkpoint)


def build_bundle(cfg: BuildConfig, on_model: Callable[[str], None] | None = None,
                 stage: Callable[[str], AbstractContextManager] = _no_progress) -> Manifest:
    """Write the bundle atomically; returns its manifest. Timings land in manifest.io['build_seconds'].

    `stage(name)` wraps every long step (loading, each export, each engine build): the CLI shows them.
    """
    check_config(cfg)
    unknown = [b for b in cfg.backends if b not in BUILD_BACKENDS]
    if unknown:
        raise UserError(f"unknown backend {unknown[0]!r}; choose from {', '.join(BUILD_BACKENDS)}")
    if len(cfg.models) < 2:
        raise UserError("give at least two --model entries (smallest first) to stitch")
    if cfg.precision not in ("fp16", "fp32"):
        raise UserError(f"--precision must be fp16 or fp32, got {cfg.precision!r}")
    if cfg.cache_scheme not in (None, *DIT_CACHE_SCHEMES):
        raise UserError(f"--cache-scheme {cfg.cache_scheme}: DiT bundles cache with {', '.join(DIT_CACHE_SCHEMES)}")
    configs = [model_config(s, cfg) for s in cfg.models]
    engine_builder = None
    trt_kinds = [b for b in cfg.backends if b in ("trt", "trt-rtx")]
    if trt_kinds:
        from tstitch_trt.export.trt_build import make_engine_builder

        engine_builder = {k: make_engine_builder(k, cfg.opt_level, cfg.timing_cache, cfg.compute_capabilities)
                          for k in trt_kinds}
    timings: dict[str, float] = {}
    with staged_bundle(cfg.out) as tmp:
        entries = []
        for i, (spec, mcfg) in enumerate(zip(cfg.models, configs, strict=True)):
            if on_model:
                on_model(spec.arch)
            with stage(f"load {spec.arch} ({spec.checkpoint})"):
                net = load_model(spec, mcfg)
            step = StepModule(net, guidance_channels=cfg.guidance_channels).eval()
            tag = f"{i}-{spec.arch.replace('/', '_')}"
            engines: dict[str, EngineEntry] = {}
            if "torch" in cfg.backends:
                # linked from the checkpoint where it already is what save_dit writes (export/torch_dirs.py)
                source = None if spec.checkpoint.startswith("random") else spec.checkpoint
                engines["torch"] = add_file(tmp, f"models/{tag}.safetensors",
                                            lambda p, n=net, s=source: save_dit_file(n, p, s),
                                            batch_range=cfg.batch_range)
            # FORA: the model's usual graph becomes its full graph (+ the kept features); a cached one beside it
            feature = feature_spec(mcfg) if cfg.cache_scheme == "fora" else None
            cached: dict[str, EngineEntry] = {}
            onnx_paths: dict[tuple[str, str], Path] = {}
            for precision in _onnx_precisions(cfg):
                for mode in ("full", "cached") if feature else ("full",):
                    t0 = time.perf_counter()
                    suffix = "-cached" if mode == "cached" else ""
                    rel = f"onnx/{tag}{suffix}-{precision}.onnx"
                    with stage(f"export {spec.arch} {precision}{' FORA ' + mode if feature else ''} step graph"):
                        export_step_graph(step, tmp / rel, precision, fora=mode if feature else None)
                    timings[f"export {spec.arch} {precision}{suffix}"] = time.perf_counter() - t0
                    onnx_paths[(precision, mode)] = tmp / rel
                    if precision == "fp32" and "ort" in cfg.backends:
                        (cached if mode == "cached" else engines)["ort"] = _entry(tmp, rel, "fp32", cfg)
            for kind, builder in (engine_builder or {}).items():
                for mode in ("full", "cached") if feature else ("full",):
                    t0 = time.perf_counter()
                    suffix = "-cached" if mode == "cached" else ""
                    rel = f"trt/{tag}{suffix}-{kind}-{cfg.precision}.plan"
                    graph_io = io_spec(step) if feature is None else fora_graph_io(io_spec(step), feature, mode)
                    what = f"{spec.arch}{' (FORA cached)' if mode == 'cached' else ''}"
                    with stage(f"build {kind} {cfg.precision} engine of {what}"):
                        info = builder.build(onnx_paths[(cfg.precision, mode)], tmp / rel, cfg.batch_range, graph_io)
                    timings[f"build {kind} {spec.arch}{suffix}"] = time.perf_counter() - t0
                    (cached if mode == "cached" else engines)[kind] = _entry(tmp, rel, cfg.precision, cfg, builder=info)
            kept = {tmp / e.file for e in [*engines.values(), *cached.values()]}
            for p in onnx_paths.values():  # graphs only kept where a backend runs them (ort: fp32)
                if p not in kept:
                    for f in p.parent.glob(p.name + "*"):  # the graph and its external data
                        f.unlink()
            entries.append(ModelEntry(name=spec.arch, family="dit", arch=mcfg.to_dict(), engines=engines,
                                      macs_per_forward=mcfg.macs_per_forward(),
                                      cached=None if feature is None else {"feature": feature, "engines": cached}))
            del net, step
        bundle_io = io_spec(StepModule(DiT(configs[0])))
        if cfg.cache_scheme is not None:  # the kept features' role (runtime/io_roles.py), one buffer per model
            bundle_io["roles"] = {**bundle_io["roles"], "cache": [[FORA_INPUT, FORA_OUTPUT]]}
        if (tmp / "onnx").is_dir() and not any((tmp / "onnx").iterdir()):
            (tmp / "onnx").rmdir()  # every graph was only the source of engines
        manifest = Manifest(
            pipeline="dit-class-conditional",
            models=entries,
            num_classes=cfg.num_classes,
            image_size=cfg.image_size,
            latent_scale_factor=cfg.latent_scale_factor if cfg.downsample > 1 else 1.0,
            guidance_channels=cfg.guidance_channels,
            io={**bundle_io, "build_seconds": timings},
            created_by=f"tstitch-trt {__version__}, torch {torch.__version__}",
            cache=None if cfg.cache_scheme is None else {"scheme": cfg.cache_scheme},
        )
        manifest.validate()
        if cfg.vae:
            from tstitch_trt.export.vae_export import add_vae

            with stage(f"VAE decoder from {cfg.vae}"):
                manifest.vae = add_vae(tmp, cfg.vae, cfg.backends, cfg.batch_range, manifest.latent_shape,
                                       precision=cfg.precision, engine_builders=engine_builder,
                                       downsample=cfg.downsample)
        write_manifest(tmp, manifest)
    return manifest


def _onnx_precisions(cfg: BuildConfig) -> Sequence[str]:
    wanted = []
    if "ort" in cfg.backends or (cfg.precision == "fp32" and {"trt", "trt-rtx"} & set(cfg.backends)):
        wanted.append("fp32")
    if cfg.precision == "fp16" and {"trt", "trt-rtx"} & set(cfg.backends):
        wanted.append("fp16")
    return wanted


def _entry(bundle: Path, rel: str, precision: str, cfg: BuildConfig, builder: dict | None = None) -> EngineEntry:
    """The manifest entry of an artifact; an ONNX graph's external weights get their own checksums."""
    from tstitch_trt.bundle.manifest import onnx_entry, sha256_file

    if rel.endswith(".onnx"):
        return onnx_entry(bundle, rel, precision=precision, batch_range=cfg.batch_range, builder=builder or {})
    return EngineEntry(file=rel, sha256=sha256_file(bundle / rel), precision=precision,
                       batch_range=cfg.batch_range, builder=builder or {})
