"""`tstitch-trt info`: describe a bundle (DiT or SD / SDXL, with its ControlNet, LCM guidance, LoRAs) and which
of its backends can run on this machine. Needs no torch."""

from __future__ import annotations

import argparse
from pathlib import Path

from tstitch_trt.demo import DEMO_NAME, resolve_bundle

NAME = "info"
HELP = "describe a bundle and which of its backends can run here"


def add_arguments(i: argparse.ArgumentParser) -> None:
    i.add_argument("--bundle", default=DEMO_NAME, help="bundle directory, or 'demo'")


def command(args: argparse.Namespace) -> int:
    from tstitch_trt.bundle.manifest import read_manifest, verify_bundle
    from tstitch_trt.pipeline.backends import backend_availability

    bundle = resolve_bundle(args.bundle)
    manifest = read_manifest(bundle)
    verify_bundle(bundle, manifest)
    print(describe_sd(bundle, manifest) if manifest.text_to_image else describe_dit(bundle, manifest))
    print("  backends on this machine:")
    for kind, ok, reason in backend_availability(manifest):
        print(f"    {kind:8s} {'can run' if ok else 'cannot run'}: {reason}")
    return 0


def describe_dit(bundle: Path, m) -> str:  # m: Manifest
    c, h, w = m.latent_shape
    lines = [
        f"bundle {bundle}: {m.pipeline}, {len(m.models)} models in stitch order (smallest first); files verified",
        f"  latent {c}x{h}x{w}, image {m.image_size}px, {m.num_classes} classes, scale factor {m.latent_scale_factor}",
        f"  schedule: {m.schedule.get('kind')} over {m.schedule.get('num_timesteps')} timesteps; "
        f"CFG on {m.guidance_channels} eps channel(s)",
    ]
    for i, model in enumerate(m.models):
        a = model.arch
        lines.append(f"  [{i}] {model.name}: depth {a['depth']}, hidden {a['hidden_size']}, heads {a['num_heads']}, "
                     f"patch {a['patch_size']}, {model.macs_per_forward / 1e9:.2f} GMACs/forward")
        for kind, e in model.engines.items():
            extra = ""
            if e.builder:
                extra = ", " + ", ".join(f"{k} {v}" for k, v in e.builder.items())
            lo, hi = e.batch_range
            lines.append(f"      {kind:8s} {e.file} ({e.precision}, batch {lo}-{hi}{extra})")
        if model.bf16:  # `check --precision bf16 --record`
            isa = ", ".join(model.bf16.get("isa") or ["an unrecorded CPU ISA: covers no CPU"])
            lines.append(f"      bf16     {'safe' if model.bf16.get('safe') else 'not safe'} on CPU backends, "
                         f"measured on {isa} ({model.bf16.get('checked_with', '?')})")
        for kind, e in (model.cached or {}).get("engines", {}).items():
            lines.append(f"      {kind:8s} {e.file} (FORA cached path, kept features "
                         f"{model.cached['feature']['shape']})")
    lines.append(f"  VAE: {', '.join(m.vae['engines']) + ' from ' + str(m.vae.get('source')) if m.vae else 'none'}")
    if m.cache:
        lines.append("  FORA: full and cached step graphs per DiT; run with --cache-interval N")
    lines.append(f"  artifacts for the whole pair: {', '.join(m.backends()) or 'none'}")
    return "\n".join(lines)


def describe_sd(bundle: Path, m) -> str:  # m: Manifest
    from tstitch_trt.sampling.sd_samplers import SCHEDULER_CLASSES

    c, h, w = m.latent_shape
    sched = m.scheduler or {}
    default = SCHEDULER_CLASSES.get(str(sched.get("_class_name")), "none: pass --sampler")
    te = m.text_encoder or {}
    lines = [
        f"bundle {bundle}: text-to-image ({m.pipeline}), {len(m.models)} U-Nets in stitch order (smallest first)",
        f"  latent {c}x{h}x{w} by default ({m.image_size}px), VAE scale factor {m.latent_scale_factor}",
        f"  scheduler {sched.get('_class_name')} (default sampler {default}), "
        f"{sched.get('beta_schedule')} over {sched.get('num_train_timesteps')} timesteps",
        f"  text encoder {te.get('kind')} ({te.get('hidden_state')} hidden state): {', '.join(te.get('engines', {}))}",
        f"  guidance {m.guidance_mode}" + (" (LCM's guidance embedding: prompts only, no negative prompt)"
                                           if m.guidance_mode == "embedding" else " (classifier-free, batch doubled)"),
    ]
    if m.text_encoder_2:
        te2, cond = m.text_encoder_2, m.conditioning or {}
        lines.append(f"  text encoder 2 {te2.get('kind')} ({te2.get('hidden_state')} hidden state, pooled text_embeds "
                     f"{cond.get('text_embeds_dim')}): {', '.join(te2.get('engines', {}))}")
        lines.append(f"  SDXL conditioning: time ids (original size, crop, target size), "
                     f"force_zeros_for_empty_prompt {cond.get('force_zeros_for_empty_prompt')}")
    for i, model in enumerate(m.models):
        a = model.arch
        lines.append(f"  [{i}] {model.name}: U-Net blocks {a.get('block_out_channels')}, layers/block "
                     f"{a.get('layers_per_block')}, mid block {a.get('mid_block_type', 'UNetMidBlock2DCrossAttn')}, "
                     f"cross-attention {a.get('cross_attention_dim')}"
                     + (f", guidance embedding {a['time_cond_proj_dim']}" if a.get("time_cond_proj_dim") else ""))
        for lora in model.lora or []:
            lines.append(f"      LoRA fused: {lora['source']} (scale {lora['scale']:g})")
        for kind, e in model.engines.items():
            lo, hi = e.batch_range
            lines.append(f"      {kind:8s} {e.file} ({e.precision}, batch {lo}-{hi})")
        for kind, e in (model.cached or {}).get("engines", {}).items():
            lines.append(f"      {kind:8s} {e.file} (DeepCache cached path, kept feature "
                         f"{model.cached['feature']['shape']})")
    lines.append(f"  VAE: {', '.join(m.vae['engines']) if m.vae else 'none'}")
    lines += [f"    {note}" for note in (m.vae or {}).get("notes", [])]
    if m.controlnet:
        net = m.controlnet
        lines.append(f"  ControlNet ({net['family']}, {net['conditioning_channels']}-channel image) inside every U-Net "
                     f"step graph, from {net.get('source', '?')}: run with --control-image FILE")
    if m.cache:
        lines.append(f"  DeepCache branch {m.cache['branch']}: full and cached step graphs per U-Net; run with "
                     "--cache-interval N")
    lines.append(f"  backends usable for the whole set: {', '.join(m.backends()) or 'none'}")
    return "\n".join(lines)
