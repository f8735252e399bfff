"""`tstitch-trt build` for Stable Diffusion 1.x and SDXL: diffusers directories -> an sd / sdxl bundle.

Each --model is a diffusers pipeline directory, a U-Net directory or a hub id; the LAST must be
a full pipeline and supplies the tokenizer, text encoder, VAE and scheduler (T-Stitch's rule).
Written (per requested backend): tokenizer.json; the CLIP text encoder (torch: the diffusers
directory; ort: fp32 ONNX; trt/trt-rtx: engine from the fp16-typed graph); one U-Net step graph per
model (the same kinds); the VAE decoder (export/vae_export.py). The manifest is kind "sd".
SDXL (a StableDiffusionXLPipeline last): also tokenizer_2 and text_encoder_2 (its graph has two
outputs: the penultimate hidden state and the pooled text_embeds), both encoders' penultimate hidden
state taken raw (no final layer norm, as diffusers' encode_prompt); the step graphs take text_embeds
and time_ids; the manifest is kind "sdxl" with its conditioning (force_zeros_for_empty_prompt).
--controlnet adds one ControlNet inside every U-Net step graph (export/controlnet_build.py).
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tstitch_trt import __version__
from tstitch_trt.bundle.manifest import (
    EngineEntry,
    Manifest,
    ModelEntry,
    onnx_entry,
    sha256_file,
    write_manifest,
)
from tstitch_trt.bundle.staging import staged_bundle
from tstitch_trt.errors import UserError, first_line
from tstitch_trt.export.deep_cache import CACHE_INPUT, CACHE_OUTPUT, check_branch, config_structure
from tstitch_trt.export.lora import LoraSpec, check_loras, fuse_loras, lora_targets
from tstitch_trt.export.torch_dirs import save_model_dir
from tstitch_trt.export.unet_export import (
    cache_feature_spec,
    cache_graph_io,
    export_text_encoder,
    export_unet_step,
    text_io_spec,
    unet_io_spec,
)
from tstitch_trt.export.unet_step import GUIDANCE_MODES, UNetStepModule
from tstitch_trt.models.sd import SdSource, check_pair, load_text_encoder, load_unet, resolve_source

BUILD_BACKENDS = ("torch", "ort", "trt", "trt-rtx")


@contextmanager
def _no_progress(name: str) -> Iterator[None]:
    yield


@dataclass
class SdBuildConfig:
    models: list[str]  # directories or hub ids, smallest first; the last is a full pipeline
    out: Path
    backends: list[str] = field(default_factory=lambda: ["torch", "ort"])
    precision: str = "fp16"  # engines; ort is always fp32
    batch_range: tuple[int, int] = (1, 4)
    opt_level: int = 3
    timing_cache: str | None = None
    compute_capabilities: tuple[str, ...] = ()
    guidance: str = "auto"  # "auto" | GUIDANCE_MODES: how the step graphs take the guidance scale
    loras: list[LoraSpec] = field(default_factory=list)  # fused into their U-Net before export
    controlnet: str | None = None  # a diffusers ControlNetModel directory or hub id, inside every step graph
    cache_branch: int | None = None  # DeepCache's cache_branch_id: also write each model's cached step graph


def build_sd_bundle(cfg: SdBuildConfig, on_model: Callable[[str], None] | None = None,
                    stage: Callable[[str], AbstractContextManager] = _no_progress) -> Manifest:
    """Write the bundle atomically. `stage(name)` wraps every long step (each load, export and engine
    build, one model at a time): the CLI prints each with its time and peak memory."""
    unknown = [b for b in cfg.backends if b not in BUILD_BACKENDS]
    if unknown:
        raise UserError(f"unknown backend {unknown[0]!r}; choose from {', '.join(BUILD_BACKENDS)}")
    if len(cfg.models) < 2:
        raise UserError("give at least two --model entries (smallest first) to stitch")
    sources = [resolve_source(m) for m in cfg.models]
    facts = check_pair(sources)
    large = sources[-1].pipeline
    assert large is not None  # check_pair refuses otherwise
    _preflight(sources, large, facts["pipeline"])
    scheduler = _read_scheduler(large)
    guidance = resolve_guidance(cfg.guidance, sources)
    loras = lora_targets(cfg.loras, [s.name for s in sources])
    check_loras(loras, [_lora_label(j, sources) for j in range(len(sources))], [s.unet_config() for s in sources])
    control = None
    if cfg.controlnet:
        from tstitch_trt.export.controlnet_build import prepare_controlnet

        control = prepare_controlnet(cfg.controlnet, [(s.name, s.unet_config()) for s in sources], facts["vae_factor"])
    if cfg.cache_branch is not None:
        for s in sources:  # every U-Net must have the branch: refused before any weights load
            check_branch(config_structure(s.unet_config()), cfg.cache_branch, f"U-Net {s.name}")
    builders = _engine_builders(cfg)
    timings: dict[str, float] = {}
    text_len = facts["text_max_length"]
    sdxl = facts["pipeline"] == "sdxl"
    with staged_bundle(cfg.out) as tmp:
        tokenizer = _write_tokenizer(tmp, large, text_len)
        t0 = time.perf_counter()
        # SDXL: both encoders' penultimate hidden state, raw (diffusers' SDXL encode_prompt)
        text_encoder = _write_text_encoder(tmp, large, cfg, builders, text_len, facts["text_width"],
                                           layer="penultimate-raw" if sdxl else "last", stage=stage)
        timings["text encoder"] = time.perf_counter() - t0
        sdxl_parts: dict[str, Any] = {}
        if sdxl:
            t0 = time.perf_counter()
            sdxl_parts = _write_sdxl_text_parts(tmp, large, cfg, builders, facts, stage)
            timings["text encoder 2"] = time.perf_counter() - t0
        entries, io = [], None
        for i, src in enumerate(sources):
            if on_model:
                on_model(src.name)
            t0 = time.perf_counter()
            entry, io = _write_unet(tmp, i, src, cfg, builders, text_len, guidance, loras.get(i, []),
                                    control and control[1], facts["vae_factor"], stage)
            entries.append(entry)
            timings[f"unet {src.name}"] = time.perf_counter() - t0
        if cfg.cache_branch is not None:  # export/deep_cache.py: the kept feature's role
            assert io is not None
            io = {**io, "roles": {**io["roles"], "cache": [[CACHE_INPUT, CACHE_OUTPUT]]}}
        c, s = facts["latent_channels"], facts["sample_size"]
        t0 = time.perf_counter()
        from tstitch_trt.export.vae_export import add_vae

        # the fp16 probe decodes N(0,1) / scaling_factor: what the pipeline feeds (SDXL's VAE overflows there)
        with stage(f"VAE decoder ({', '.join(b for b in cfg.backends)})"):
            vae = add_vae(tmp, str(large / "vae"), cfg.backends, cfg.batch_range, (c, s, s),
                          precision=cfg.precision, engine_builders=builders, downsample=facts["vae_factor"],
                          dynamic_hw=True, probe_scale=1.0 / facts["latent_scale_factor"] if sdxl else None,
                          honour_force_upcast=sdxl)  # diffusers' SD 1.x pipeline ignores the flag, SDXL's obeys it
        timings["vae"] = time.perf_counter() - t0
        conditioning = {**sdxl_parts.pop("conditioning", {}), "guidance": guidance}
        if control:
            from tstitch_trt.export.controlnet_build import controlnet_entry

            conditioning["controlnet"] = controlnet_entry(tmp, *control, cfg.backends, cfg.batch_range)
        manifest = Manifest(
            pipeline=facts["pipeline"],
            models=entries,
            num_classes=0,
            image_size=s * facts["vae_factor"],
            latent_scale_factor=facts["latent_scale_factor"],
            guidance_channels=c,
            schedule={"kind": scheduler.get("beta_schedule", "linear"),
                      "num_timesteps": int(scheduler.get("num_train_timesteps", 1000))},
            vae=vae,
            io={**(io or {}), "build_seconds": timings},
            created_by=f"tstitch-trt {__version__}, torch {torch.__version__}",
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler=scheduler,
            conditioning=conditioning,
            cache=None if cfg.cache_branch is None else {"scheme": "deepcache", "branch": cfg.cache_branch},
            **sdxl_parts,
        )
        write_manifest(tmp, manifest)
    return manifest


def _preflight(sources: list[SdSource], large: Path, kind: str) -> None:
    """Before anything is exported: every weights file a safetensors with a sound header (never a pickle), and
    every U-Net's size from its config within this machine's memory (models/preflight.py)."""
    from tstitch_trt.models.preflight import available_memory_bytes, check_fits_memory, check_weights_dir

    for src in sources:
        check_weights_dir(src.unet_dir, f"the U-Net weights of --model {src.spec}")
    parts = ("text_encoder", "vae") + (("text_encoder_2",) if kind == "sdxl" else ())
    for part in parts:
        check_weights_dir(large / part, f"the {part} weights of {sources[-1].spec}")
    check_fits_memory([(f"--model {s.spec}: unet/config.json" if s.pipeline else f"--model {s.spec}: config.json",
                        s.unet_config()) for s in sources], available_memory_bytes())


def resolve_guidance(requested: str, sources: list[SdSource]) -> str:
    """"embedding" (LCM's guidance embedding, no CFG batch) when any U-Net has time_cond_proj_dim, else
    "cfg"; --guidance cfg|embedding overrides."""
    if requested == "auto":
        return "embedding" if any(s.unet_config().get("time_cond_proj_dim") for s in sources) else "cfg"
    if requested not in GUIDANCE_MODES:
        raise UserError(f"--guidance {requested!r}: choose auto, {', '.join(GUIDANCE_MODES)}")
    return requested


def _lora_label(j: int, sources: list[SdSource]) -> str:
    """How --lora names model j: small (the first), large (the last), or its name."""
    return "small" if j == 0 else "large" if j == len(sources) - 1 else sources[j].name


def _read_scheduler(large: Path) -> dict[str, Any]:
    path = large / "scheduler" / "scheduler_config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the large pipeline's scheduler config {path}: {e}") from None


def _engine_builders(cfg: SdBuildConfig) -> dict[str, Any] | None:
    kinds = [b for b in cfg.backends if b in ("trt", "trt-rtx")]
    if not kinds:
        return None
    from tstitch_trt.export.trt_build import make_engine_builder

    return {k: make_engine_builder(k, cfg.opt_level, cfg.timing_cache, cfg.compute_capabilities) for k in kinds}


def _write_tokenizer(tmp: Path, large: Path, text_len: int, part: str = "tokenizer") -> dict[str, Any]:
    """tokenizer.json for the runtime's `tokenizers` (transformers' CLIPTokenizer writes it); pad_id is the
    tokenizer's own (SDXL's tokenizer_2 pads with "!", id 0)."""
    from transformers import CLIPTokenizer

    try:
        tok = CLIPTokenizer.from_pretrained(str(large / part))
    except Exception as e:
        first = first_line(e)
        raise UserError(f"cannot load the tokenizer in {large / part}: {first}") from None
    tok.save_pretrained(str(tmp / part))
    rel = f"{part}/tokenizer.json"
    if not (tmp / rel).is_file():
        raise UserError(f"the tokenizer in {large / part} could not be written as tokenizer.json")
    max_length = min(int(tok.model_max_length), text_len)
    return {"file": {"file": rel, "sha256": sha256_file(tmp / rel)}, "max_length": max_length,
            "pad_id": int(tok.pad_token_id), "kind": "clip"}


def _write_text_encoder(tmp: Path, large: Path, cfg: SdBuildConfig, builders: dict | None, text_len: int,
                        width: int, part: str = "text_encoder", layer: str = "last",
                        pooled_dim: int = 0, stage: Callable[[str], AbstractContextManager] = _no_progress
                        ) -> dict[str, Any]:
    """One CLIP text encoder's artifacts; pooled_dim > 0 (SDXL text_encoder_2): its graphs also output the
    pooled text_embeds."""
    with stage(f"load {part}"):
        clip = load_text_encoder(large, part)
    kind = type(clip).__name__
    engines: dict[str, EngineEntry] = {}
    pooled = pooled_dim > 0
    io = text_io_spec(text_len, width, cfg.batch_range, pooled_dim)
    if "torch" in cfg.backends:
        with stage(f"save {part} (torch)"):
            engines["torch"] = save_model_dir(clip, tmp, f"{part}/diffusers", large / part)
    if "ort" in cfg.backends:
        rel = f"{part}/{part}-fp32.onnx"
        with stage(f"export {part} fp32 graph (ort)"):
            export_text_encoder(clip, tmp / rel, "fp32", text_len, layer, pooled)
            engines["ort"] = onnx_entry(tmp, rel, batch_range=cfg.batch_range)
    if builders:
        graph = tmp / f"{part}/{part}-{cfg.precision}-src.onnx"
        with stage(f"export {part} {cfg.precision} graph (engines)"):
            export_text_encoder(clip, graph, cfg.precision, text_len, layer, pooled, consume=True)
        del clip  # the engine builds need only the graph
        engines.update(_engine_entries(tmp, builders, graph, f"{part}/{part}", cfg, io, stage))
    entry = {"source": str(large / part), "kind": kind, "hidden_state": layer, "engines": engines,
             "io": io}
    if pooled:
        entry["pooled"] = True
    return entry


def _write_sdxl_text_parts(tmp: Path, large: Path, cfg: SdBuildConfig, builders: dict | None,
                           facts: dict[str, Any], stage: Callable[[str], AbstractContextManager] = _no_progress
                           ) -> dict[str, Any]:
    """SDXL's tokenizer_2, text_encoder_2 (OpenCLIP bigG with projection) and the manifest's conditioning."""
    text_len = facts["text_2_max_length"]
    return {
        "tokenizer_2": _write_tokenizer(tmp, large, text_len, "tokenizer_2"),
        "text_encoder_2": _write_text_encoder(tmp, large, cfg, builders, text_len, facts["text_2_width"],
                                              part="text_encoder_2", layer="penultimate-raw",
                                              pooled_dim=facts["text_embeds_dim"], stage=stage),
        "conditioning": {"guidance": "cfg", "force_zeros_for_empty_prompt": facts["force_zeros_for_empty_prompt"],
                         "text_embeds_dim": facts["text_embeds_dim"], "time_ids": 6},
    }


def _write_unet(tmp: Path, i: int, src: SdSource, cfg: SdBuildConfig, builders: dict | None,
                text_len: int, guidance: str, loras: list[LoraSpec], controlnet: torch.nn.Module | None = None,
                pixel_factor: int = 8, stage: Callable[[str], AbstractContextManager] = _no_progress
                ) -> tuple[ModelEntry, dict]:
    """pixel_factor: the VAE's (a ControlNet's image is pixel_factor x the latent). One U-Net in memory at a
    time: it is freed before the engine builds (they need only the graph) and before the next model loads."""
    with stage(f"load U-Net {src.name}"):
        unet = load_unet(src.unet_dir)
        lora = fuse_loras(unet, loras) if loras else None
        step = UNetStepModule(unet, controlnet, guidance=guidance).eval()
    tag = f"{i}-{src.name}"
    feature = None  # DeepCache: the kept feature's spec (one probe call; refuses a branch this U-Net lacks)
    if cfg.cache_branch is not None:
        feature = cache_feature_spec(step, cfg.cache_branch, text_len, pixel_factor, name=f"U-Net {src.name}")
    full = None if feature is None else (cfg.cache_branch, "full", feature)
    engines: dict[str, EngineEntry] = {}
    cached: dict[str, EngineEntry] = {}
    if "torch" in cfg.backends:
        rel_dir = f"unet/{tag}"
        with stage(f"save U-Net {src.name} (torch)"):
            # linked from the source unless a LoRA was fused into it
            engines["torch"] = save_model_dir(unet, tmp, rel_dir, None if lora else src.unet_dir,
                                              batch_range=cfg.batch_range)
    if "ort" in cfg.backends:
        rel = f"onnx/{tag}-fp32.onnx"
        with stage(f"export U-Net {src.name} fp32 step graph (ort)"):
            export_unet_step(step, tmp / rel, "fp32", text_len, pixel_factor, full)
            engines["ort"] = onnx_entry(tmp, rel, batch_range=cfg.batch_range)
        if feature is not None:
            rel = f"onnx/{tag}-cached-fp32.onnx"
            with stage(f"export U-Net {src.name} cached fp32 step graph (ort)"):
                export_unet_step(step, tmp / rel, "fp32", text_len, pixel_factor, (cfg.cache_branch, "cached", feature))
                cached["ort"] = onnx_entry(tmp, rel, batch_range=cfg.batch_range)
    io = unet_io_spec(step, text_len, pixel_factor)
    if builders:
        graph = tmp / f"onnx/{tag}-{cfg.precision}-src.onnx"
        # the last use of the step (no cached graph, no ControlNet shared with the next U-Net): converted in place
        last = feature is None and controlnet is None
        with stage(f"export U-Net {src.name} {cfg.precision} step graph (engines)"):
            export_unet_step(step, graph, cfg.precision, text_len, pixel_factor, full, consume=last)
        if feature is None:  # nothing left to export from it: freed before the engine build holds the graph
            del step, unet   # (SDXL: its 4.8 GB of fp16 weights beside TensorRT's parsed copy and the plan)
            gc.collect()
        engines.update(_engine_entries(tmp, builders, graph, f"trt/{tag}", cfg,
                                       io if feature is None else cache_graph_io(io, feature, "full"), stage))
        if feature is not None:
            graph = tmp / f"onnx/{tag}-cached-{cfg.precision}-src.onnx"
            with stage(f"export U-Net {src.name} cached {cfg.precision} step graph (engines)"):
                export_unet_step(step, graph, cfg.precision, text_len, pixel_factor,
                                 (cfg.cache_branch, "cached", feature))
            cached.update(_engine_entries(tmp, builders, graph, f"trt/{tag}-cached", cfg,
                                          cache_graph_io(io, feature, "cached"), stage))
    if not (builders and feature is None):  # else freed before the engine builds
        del step, unet
    arch = {k: v for k, v in src.unet_config().items() if not k.startswith("_")}
    entry = ModelEntry(name=src.name, family="unet", arch=arch, engines=engines, lora=lora,
                       cached=None if feature is None else {"feature": feature, "engines": cached})
    return entry, io


def _engine_entries(tmp: Path, builders: dict[str, Any], graph: Path, stem: str, cfg: SdBuildConfig,
                    io: dict, stage: Callable[[str], AbstractContextManager] = _no_progress
                    ) -> dict[str, EngineEntry]:
    """One engine per builder kind from the fp16 (or fp32) source graph, written as STEM-KIND-PRECISION.plan;
    the source graph is removed afterwards (engines are what the bundle keeps)."""
    engines = {}
    for kind, builder in builders.items():
        rel = f"{stem}-{kind}-{cfg.precision}.plan"
        with stage(f"build {kind} {cfg.precision} engine {Path(rel).name}"):
            info = builder.build(graph, tmp / rel, cfg.batch_range, io)
        engines[kind] = EngineEntry(file=rel, sha256=sha256_file(tmp / rel), precision=cfg.precision,
                                    batch_range=cfg.batch_range, builder=info)
    for f in graph.parent.glob(graph.name + "*"):  # the source graph and its external weights
        f.unlink()
    return engines
