"""Build settings from `--recipe export/NAME.toml` merged with command-line flags (flags win)."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

from tstitch_trt.errors import UserError
from tstitch_trt.export.build import BuildConfig, ModelSpec

_KEYS: dict[str, type | tuple[type, ...]] = {
    "image_size": int, "num_classes": int, "latent_channels": int, "downsample": int, "vae": str,
    "precision": str, "guidance_channels": (str, int), "opt_level": int, "timing_cache": str, "out": str,
    "models": list, "backend": (str, list), "batch_sizes": (str, int), "name": str, "description": str,
    "compute_capabilities": (str, list),  # TensorRT-RTX targets, e.g. "8.9,12.0"
    "arch_overrides": dict,  # {"DiT-S/2": {"depth": 2}}: DiTConfig fields for custom (or tiny test) models
    "cache_scheme": str,  # "fora": also FORA's cached step graphs (run --cache-interval N)
}


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The recipe's settings, checked for unknown keys and types (a typo must not be ignored)."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"recipe {p} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"recipe {p} is not valid TOML: {e}") from None
    unknown = set(data) - set(_KEYS)
    if unknown:
        raise UserError(f"recipe {p}: unknown setting {sorted(unknown)[0]!r} (known: {', '.join(sorted(_KEYS))})")
    for key, value in data.items():
        if not isinstance(value, _KEYS[key]) or (isinstance(value, bool) and _KEYS[key] is int):
            raise UserError(f"recipe {p}: {key} = {value!r} has the wrong type")
    for m in data.get("models", []):
        if not isinstance(m, dict) or not isinstance(m.get("arch"), str) or not isinstance(m.get("checkpoint"), str):
            raise UserError(f"recipe {p}: each [[models]] entry needs arch = \"DiT-S/2\" and checkpoint = \"PATH\"")
        if set(m) - {"arch", "checkpoint"}:
            # TOML puts plain keys written after a [[models]] header inside that table
            raise UserError(f"recipe {p}: unknown setting {sorted(set(m) - {'arch', 'checkpoint'})[0]!r} in a "
                            f"[[models]] entry (settings go above the first [[models]])")
    return data


def build_config_from_args(args: argparse.Namespace) -> BuildConfig:
    recipe = read_recipe(args.recipe) if args.recipe else {}

    def pick(name: str, default: Any) -> Any:
        v = getattr(args, name, None)
        return v if v is not None else recipe.get(name, default)

    model_texts = args.model or [f"{m['arch']}={m['checkpoint']}" for m in recipe.get("models", [])]
    if not model_texts:
        raise UserError("give the models to stitch, smallest first: --model DiT-S/2=CKPT --model DiT-XL/2=CKPT")
    models = []
    for text in model_texts:
        arch, sep, ckpt = text.partition("=")
        if not sep or not arch or not ckpt:
            raise UserError(f"--model takes ARCH=CHECKPOINT (e.g. DiT-S/2=DiT-S-2.pt), got {text!r}")
        ckpt = ckpt.strip()
        kind, colon, seed = ckpt.partition(":")
        if kind == "random" and colon and not seed.strip().isdigit():
            raise UserError(f"--model {text[:80]}: random:SEED takes a non-negative integer seed, got {seed[:40]!r}")
        models.append(ModelSpec(arch.strip(), ckpt))
    backend_text = args.backend or recipe.get("backend", "torch,ort")
    backends = [b.strip() for b in (backend_text.split(",") if isinstance(backend_text, str) else backend_text)]
    batch = args.batch_sizes or _batch(recipe.get("batch_sizes", "1-16"))
    overrides = recipe.get("arch_overrides", {})
    if not all(isinstance(v, dict) for v in overrides.values()):
        raise UserError("recipe: arch_overrides maps an architecture to a table of DiTConfig fields")
    g = str(pick("guidance_channels", "3"))
    if g != "all" and not g.isdigit():
        raise UserError(f"--guidance-channels takes a number or 'all', got {g!r}")
    latent_channels = int(pick("latent_channels", 4))
    name = recipe.get("name") or "-".join(m.arch.replace("/", "").lower() for m in models)
    return BuildConfig(
        models=models,
        out=Path(pick("out", f"engines/{name}")),
        backends=backends,
        image_size=int(pick("image_size", 256)),
        num_classes=int(pick("num_classes", 1000)),
        latent_channels=latent_channels,
        downsample=int(pick("downsample", 8)),
        vae=pick("vae", None),
        precision=pick("precision", "fp16"),
        batch_range=batch,
        guidance_channels=latent_channels if g == "all" else int(g),
        opt_level=int(pick("opt_level", 3)),
        timing_cache=pick("timing_cache", None),
        compute_capabilities=_capabilities(pick("compute_capabilities", [])),
        arch_overrides=overrides,
        cache_scheme=pick("cache_scheme", None),
    )


def _batch(text: str | int) -> tuple[int, int]:
    lo, _, hi = str(text).partition("-")
    try:
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise UserError(f"recipe: batch_sizes takes N or MIN-MAX, got {text!r}") from None
    if not 1 <= a <= b:
        raise UserError(f"recipe: batch_sizes needs 1 <= MIN <= MAX, got {text!r}")
    return a, b


def _capabilities(value: str | list) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    caps = tuple(v.strip() for v in items if v.strip())
    for c in caps:
        major, dot, minor = c.partition(".")
        if not (dot and major.isdigit() and minor.isdigit()):
            raise UserError(f"compute capabilities look like 8.9 or 12.0, got {c!r}")
    return caps
