"""POST /v1/generate: parsing, validation and dispatch by the bundle's pipeline kind, in one place.

A request body is JSON with the fields and defaults of `tstitch-trt run`. The common fields (steps,
ratio or fractions, sampler, cfg_scale, eta, seed, height/width) are parsed here for every kind; each
pipeline kind adds its conditioning fields and ONE function that runs a batch of its requests:

    DiT ("dit-class-conditional"): class_labels                         -> StitchedPipeline (pipeline/dit.py)
    SD ("sd"):                     prompt, negative_prompt, num_images  -> StitchedSDPipeline (pipeline/sd.py)
    SDXL ("sdxl"):                 SD's + original_size, crop_coords, target_size (SDXL's time ids)
    + a ControlNet bundle (sd or sdxl): control_image (base64 PNG/JPEG/WebP, or a data: URL),
      controlnet_scale, guess_mode, control_guidance_start, control_guidance_end

Defaults are run's for that kind (DiT: ddim, cfg 1.5, the bundle's image size only; SD: the bundle's
scheduler's sampler, cfg 7.5 (SDXL 5.0; lcm: 4 steps and pipeline/guidance.py's cfg), any height/width
the U-Nets accept, the bundle's size by default). Requests batch together only where everything shared
by the batch agrees: the trajectory (steps, sampler, ratio, cfg ...) and, for SDXL and ControlNet, the
time ids and the control image and settings (`GenerateRequest.shared`).
Semantic checks (label range, ratio range, steps, sampler, sizes, engine batch range) are the pipeline's
own (`StitchedPipeline.validate`, `StitchedSDPipeline.validate`), so the service answers with the CLI's
messages. Every request's initial latent (and per-step noise) is drawn from its own seed, so a batch of
requests gives each the images a lone `tstitch-trt run --seed S` gives.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from tstitch_trt.bundle.manifest import Manifest
from tstitch_trt.errors import UserError, first_line
from tstitch_trt.pipeline import defaults
from tstitch_trt.pipeline.values import check_text, cut_text, shown
from tstitch_trt.runtime.loop import Cancelled

COMMON_FIELDS = ("steps", "ratio", "fractions", "sampler", "cfg_scale", "eta", "seed", "height", "width",
                 "return_latents")
TEXT_FIELDS = ("prompt", "negative_prompt", "num_images")  # what text-to-image kinds take
SDXL_FIELDS = ("original_size", "crop_coords", "target_size")  # SDXL's time ids, diffusers' names
CONTROL_FIELDS = ("control_image", "controlnet_scale", "guess_mode", "control_guidance_start",
                  "control_guidance_end")  # bundles built with --controlnet
CACHE_FIELDS = ("cache_interval", "cache_branch")  # SD: DeepCache; DiT: FORA, no branch (pipeline/caching.py)
MAX_CONTROL_IMAGE_BYTES = 32 << 20
# A prompt's text encoder reads its first 77 tokens; a longer text only costs tokenizing time, which a batch shares
MAX_PROMPT_CHARS = 16_384
MAX_FRACTIONS = 64  # one per model in the bundle


@dataclass(frozen=True)
class GenerateRequest:
    """One parsed request. ratio and fractions are both None when the service's policy picks the ratio."""

    kind: str
    conditioning: dict[str, Any]  # DiT: {"class_labels": [...]}
    num_images: int
    steps: int
    sampler: str
    cfg_scale: float
    eta: float
    seed: int
    ratio: float | None
    fractions: tuple[float, ...] | None
    height: int
    width: int
    return_latents: bool = False
    adaptive: bool = False  # ratio left to the service's load-adaptive policy
    arrival: float = field(default=0.0, compare=False)  # time.monotonic() when the replica received it
    # what a whole engine batch shares beyond the trajectory: SDXL time ids, the ControlNet's image and settings
    shared: tuple = ()
    extras: dict[str, Any] = field(default_factory=dict, compare=False)  # their parsed values (pipeline kwargs)

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys can share one engine batch (same trajectory tables, same guidance)."""
        return (self.kind, self.steps, self.sampler, self.cfg_scale, self.eta, self.ratio, self.fractions,
                self.height, self.width, self.shared)


@dataclass(frozen=True)
class RequestResult:
    images: list[np.ndarray]  # (H, W, C) uint8 each
    latents: np.ndarray | None  # (B, C, H, W) of this request only
    report: dict[str, Any]


@dataclass(frozen=True)
class PipelineKind:
    """How one manifest pipeline kind takes requests: its conditioning fields, and its batch runner."""

    fields: tuple[str, ...]
    # (manifest, the request's sampler or None) -> run's defaults (sampler, cfg_scale, steps)
    defaults: Callable[[Manifest, str | None], tuple[str, float, int]]
    open: Callable[[Path, str, str], Any]  # (bundle dir, backend, precision) -> pipeline
    max_batch: Callable[[Any], int]  # pipeline -> the largest engine batch it can run
    parse: Callable[[dict[str, Any], Manifest, bool, int], tuple[dict[str, Any], int]]  # -> conditioning, images
    validate: Callable[[Any, GenerateRequest], None]  # (pipeline, request); raises UserError
    # one engine batch: (pipeline, requests, cancel event or None); raises runtime.loop.Cancelled once cancelled
    run_batch: Callable[..., list[RequestResult]]


# --------------------------------------------------------------------------------------------- parsing
def parse_generate(body: bytes, manifest: Manifest, is_demo: bool, max_images: int,
                   adaptive: bool = False) -> GenerateRequest:
    """The request body -> GenerateRequest, or UserError with one line (the service answers 400)."""
    try:
        data = json.loads(body or b"{}")
    except RecursionError:  # the C parser stops at Python's recursion limit, safely
        raise UserError("the request body nests JSON arrays or objects too deeply; send a flat JSON object") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"the request body is not valid JSON ({first_line(e)[:120]}); send a JSON object") from None
    except ValueError:  # a number past CPython's 4300-digit limit for int()
        raise UserError("the request body holds a number of more than 4300 digits; no field takes one") from None
    if not isinstance(data, dict):
        raise UserError(f"the request body must be a JSON object, got {type(data).__name__}")
    kind = pipeline_kind(manifest)
    spec = KINDS[kind]
    allowed = (*spec.fields, *(CONTROL_FIELDS if manifest.controlnet else ()),
               *CACHE_FIELDS, *COMMON_FIELDS)
    for name in data:
        if name in allowed:
            continue
        if name in TEXT_FIELDS or name == "class_labels" or name in SDXL_FIELDS:
            takes = ", ".join(spec.fields)
            raise UserError(f"{name!r} does not apply to this {kind} bundle; it takes {takes}")
        if name in CONTROL_FIELDS:
            raise UserError(f"{name!r} needs a bundle built with --controlnet; this bundle has no ControlNet")
        raise UserError(f"unknown field {shown(name)}; this {kind} bundle takes: {', '.join(allowed)}")

    conditioning, num_images = spec.parse(data, manifest, is_demo, max_images)
    sampler, default_cfg, default_steps = spec.defaults(manifest, _str(data, "sampler", None))
    steps = _int(data, "steps", default_steps)
    cfg_scale = _float(data, "cfg_scale", default_cfg)
    eta = _float(data, "eta", defaults.DEFAULT_ETA)
    seed = _int(data, "seed", defaults.DEFAULT_SEED)
    return_latents = _bool(data, "return_latents", False)
    ratio = _float(data, "ratio", None)
    fractions = _floats(data, "fractions")
    if ratio is not None and fractions is not None:
        raise UserError("give ratio or fractions, not both")
    height, width = _int(data, "height", manifest.image_size), _int(data, "width", manifest.image_size)
    # with the adaptive policy on, the service picks the ratio of requests that leave it out
    follow_policy = adaptive and ratio is None and fractions is None and len(manifest.models) == 2
    if not follow_policy:
        ratio, fractions_list = defaults.default_stitch(len(manifest.models), ratio, fractions)
        fractions = None if fractions_list is None else tuple(fractions_list)
    extras = {**_sdxl_extras(data, manifest), **_control_extras(data, manifest), **_cache_extras(data, manifest)}
    shared = tuple(sorted((k, v.key if hasattr(v, "key") else v) for k, v in extras.items()))
    return GenerateRequest(kind, conditioning, num_images, steps, sampler, cfg_scale, eta, seed, ratio,
                           fractions, height, width, return_latents, adaptive=follow_policy, shared=shared,
                           extras=extras)


def run_isolated(kind: PipelineKind, pipe: Any, reqs: Sequence[GenerateRequest],
                 cancel: threading.Event | None = None) -> list[RequestResult | Exception]:
    """One engine batch; if it fails, each request again alone, so that only the request that causes a
    failure gets it (its exception in its place) and its batch mates get their images. Once `cancel` is set
    (every caller gave up) the batch stops between steps and nothing is retried."""
    try:
        return list(kind.run_batch(pipe, reqs, cancel))
    except Cancelled as e:
        return [e] * len(reqs)
    except Exception as e:  # noqa: BLE001 - handed to the request(s) that cause it
        if len(reqs) == 1:
            return [e]
    out: list[RequestResult | Exception] = []
    for r in reqs:
        try:
            out.extend(kind.run_batch(pipe, [r], cancel))
        except Cancelled as e:
            out.append(e)
        except Exception as e:  # noqa: BLE001 - this request's own failure
            out.append(e)
    return out


def pipeline_kind(manifest: Manifest) -> str:
    if manifest.pipeline not in KINDS:
        raise UserError(f"serve does not know pipeline kind {manifest.pipeline!r} (it serves: {', '.join(KINDS)})")
    return manifest.pipeline


def with_ratio(req: GenerateRequest, ratio: float) -> GenerateRequest:
    return replace(req, ratio=ratio, fractions=None)


def _get(data: dict, name: str, types: tuple[type, ...], what: str, default: Any) -> Any:
    v = data.get(name)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in types or not isinstance(v, types):
        raise UserError(f"{name} must be {what}, got {shown(v)}")
    return v


def _int(data: dict, name: str, default: Any) -> Any:
    v = _get(data, name, (int,), "an integer", default)
    # no field takes more (the seed's own check words its range); the checks' messages then never quote it whole
    if v is not None and name != "seed" and v.bit_length() > 64:
        raise UserError(f"{name} must be an integer of at most 64 bits, got {shown(v)}")
    return v


def _float(data: dict, name: str, default: Any) -> Any:
    v = _get(data, name, (int, float), "a number", default)
    try:
        return None if v is None else float(v)
    except OverflowError:  # an integer past float's range: the pipeline's check words it
        return math.inf


def _str(data: dict, name: str, default: Any) -> Any:
    return _get(data, name, (str,), "a string", default)


def _bool(data: dict, name: str, default: bool) -> bool:
    return _get(data, name, (bool,), "true or false", default)


def _floats(data: dict, name: str) -> tuple[float, ...] | None:
    v = _get(data, name, (list,), "a list of numbers", None)
    if v is None:
        return None
    if len(v) > MAX_FRACTIONS or not all(isinstance(f, int | float) and not isinstance(f, bool) for f in v):
        raise UserError(f"{name} must be a list of numbers (one per model), got {shown(v)}")
    try:
        return tuple(float(f) for f in v)
    except OverflowError:  # an integer past float's range
        raise UserError(f"{name} must be finite numbers, got {shown(v)}") from None


# ------------------------------------------------------------------------------- DiT, class-conditional
def _dit_parse(data: dict, manifest: Manifest, is_demo: bool, max_images: int) -> tuple[dict, int]:
    labels = _get(data, "class_labels", (list,), "a list of integers", None)
    if labels is None:
        labels = defaults.default_class_labels(manifest.num_classes, is_demo)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        raise UserError(f"class_labels must be a list of integers, got {shown(labels)}")
    if len(labels) > max_images:
        raise UserError(f"{len(labels)} class labels, but this service runs at most {max_images} images per "
                        "request (--max-batch-size); split the request")
    size = manifest.image_size
    for side in ("height", "width"):
        v = _int(data, side, size)
        if v != size:
            raise UserError(f"{side} {v} is not this bundle's image size; its models make {size}x{size} images")
    return {"class_labels": list(labels)}, len(labels)


def _dit_defaults(manifest: Manifest, sampler: str | None) -> tuple[str, float, int]:
    return sampler or defaults.DEFAULT_SAMPLER, defaults.DEFAULT_CFG_SCALE, defaults.DEFAULT_STEPS


def _dit_open(bundle: Path, backend: str, precision: str = "auto") -> Any:
    from tstitch_trt.pipeline.dit import StitchedPipeline

    return StitchedPipeline.from_bundle(bundle, backend=backend, precision=precision)


def _max_batch(pipe: Any) -> int:
    """The largest batch every artifact of the pipeline's backend was built for (models and VAE)."""
    return pipe.manifest.batch_limits(pipe.backend.name)[1]


def _dit_validate(pipe: Any, req: GenerateRequest) -> None:
    labels = np.asarray(req.conditioning["class_labels"], dtype=np.int64)
    pipe.validate(labels, req.ratio, req.fractions, req.steps, req.sampler, None, cfg_scale=req.cfg_scale,
                  eta=req.eta, seed=req.seed, cache_interval=req.extras.get("cache_interval", 1))


def _dit_run_batch(pipe: Any, reqs: Sequence[GenerateRequest],
                   cancel: threading.Event | None = None) -> list[RequestResult]:
    """One engine batch: each request's noise drawn from its own seed, concatenated, split back."""
    from tstitch_trt.pipeline.dit import request_noise

    first = reqs[0]
    latent_shape = pipe.manifest.latent_shape
    labels: list[int] = []
    inits, step_noises = [], []
    for r in reqs:
        labels.extend(r.conditioning["class_labels"])
        x, noise = request_noise(r.seed, r.num_images, latent_shape, r.steps, r.sampler, r.eta)
        inits.append(x)
        step_noises.append(noise)
    step_noise = None if step_noises[0] is None else np.concatenate(step_noises, axis=1)
    res = pipe(class_labels=labels, ratio=first.ratio, fractions=first.fractions, steps=first.steps,
               sampler=first.sampler, cfg_scale=first.cfg_scale, seed=first.seed, eta=first.eta,
               init_noise=np.concatenate(inits, axis=0), step_noise=step_noise, progress=False, cancel=cancel,
               cache_interval=first.extras.get("cache_interval", 1))
    out, start = [], 0
    for r in reqs:
        stop = start + r.num_images
        report = dict(res.report, class_labels=r.conditioning["class_labels"], seed=r.seed, batch=r.num_images,
                      batch_size=len(labels), ratio=first.ratio,
                      fractions=None if first.fractions is None else list(first.fractions))
        images = [] if res.images is None else list(res.images[start:stop])
        latents = res.latents[start:stop].copy() if r.return_latents else None
        out.append(RequestResult(images, latents, report))
        start = stop
    return out


# ------------------------------------------------------------------------------- SD 1.x, text-to-image


def _texts(data: dict, name: str) -> list[str] | None:
    v = _get(data, name, (str, list), "a string or a list of strings", None)
    if v is None:
        return None
    texts = [v] if isinstance(v, str) else v
    if not all(isinstance(t, str) for t in texts):
        raise UserError(f"{name} must be a string or a list of strings, got {shown(v)}")
    for t in texts:
        if len(t) > MAX_PROMPT_CHARS:
            raise UserError(f"{name} is {len(t)} characters; this service takes at most {MAX_PROMPT_CHARS} (the text "
                            "encoder reads the first 77 tokens)")
        check_text(name, t)
    return list(texts)


def _sd_parse(data: dict, manifest: Manifest, is_demo: bool, max_images: int) -> tuple[dict, int]:
    prompts = _texts(data, "prompt")
    if not prompts:
        raise UserError("this is a text-to-image (sd) bundle: give \"prompt\" (a string or a list of strings)")
    negatives = _texts(data, "negative_prompt")
    if negatives is None:  # the pipeline's rule: SD encodes "", SDXL zeros, LCM guidance takes none
        negatives = [None] * len(prompts)
    elif len(negatives) == 1:
        negatives = negatives * len(prompts)
    elif len(negatives) != len(prompts):
        raise UserError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one per prompt")
    num_images = _int(data, "num_images", 1)
    if num_images < 1:
        raise UserError("give at least one prompt and --num-images >= 1")
    images = len(prompts) * num_images
    if images > max_images:
        raise UserError(f"{len(prompts)} prompts x {num_images} images = {images} images, but this service runs "
                        f"at most {max_images} images per request (--max-batch-size); split the request")
    return {"prompt": prompts, "negative_prompt": negatives, "num_images": num_images}, images


def _sd_defaults(manifest: Manifest, sampler: str | None) -> tuple[str, float, int]:
    from tstitch_trt.pipeline import guidance
    from tstitch_trt.sampling.sd_samplers import default_sampler

    sampler = sampler or default_sampler(manifest.scheduler or {})
    return sampler, guidance.default_cfg_scale(manifest, sampler), guidance.default_steps(sampler)


def _pair(data: dict, name: str) -> tuple[int, int] | None:
    v = _get(data, name, (list,), "a list of two integers", None)
    if v is None:
        return None
    if len(v) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        raise UserError(f"{name} must be a list of two integers, got {shown(v)}")
    return int(v[0]), int(v[1])


def _sdxl_extras(data: dict, manifest: Manifest) -> dict[str, Any]:
    """SDXL's time ids (pipeline kwargs of the same names); absent: the pipeline's defaults."""
    if manifest.pipeline != "sdxl":
        return {}
    return {k: v for k in SDXL_FIELDS if (v := _pair(data, k)) is not None}


@dataclass(frozen=True)
class _ControlImage:
    """A decoded control image and a digest of its bytes: requests batch only with the same image."""

    image: np.ndarray
    key: str


def _cache_extras(data: dict, manifest: Manifest) -> dict[str, Any]:
    """cache_interval / cache_branch as given, checked against the bundle by the pipeline's own rule (they are
    batch-shared: one trajectory plan per batch)."""
    if not any(n in data for n in CACHE_FIELDS):
        return {}
    from tstitch_trt.pipeline.caching import check_cache, check_dit_cache

    interval, branch = _int(data, "cache_interval", 1), _int(data, "cache_branch", None)
    if not manifest.text_to_image:  # FORA: the interval only (a branch is refused with one line)
        return {"cache_interval": check_dit_cache(manifest, interval, branch)}
    interval, branch = check_cache(manifest, interval, branch)
    return {"cache_interval": interval, "cache_branch": branch}


def _control_extras(data: dict, manifest: Manifest) -> dict[str, Any]:
    """The ControlNet's image (decoded once here) and settings; a ControlNet bundle needs the image."""
    if not manifest.controlnet:
        return {}
    encoded = _str(data, "control_image", None)
    if encoded is None:
        raise UserError("this bundle was built with a ControlNet: give \"control_image\" (a base64 PNG/JPEG/WebP)")
    out: dict[str, Any] = {"control_image": _decode_control_image(encoded, manifest)}
    for name in ("controlnet_scale", "control_guidance_start", "control_guidance_end"):
        if (v := _float(data, name, None)) is not None:
            out[name] = v
    if _bool(data, "guess_mode", False):
        out["guess_mode"] = True
    return out


def _decode_control_image(encoded: str, manifest: Manifest) -> _ControlImage:
    import base64
    import binascii
    import hashlib
    import io

    from tstitch_trt.pipeline.control import control_size_limit, read_control_image

    payload = encoded.split(",", 1)[1] if encoded.startswith("data:") else encoded
    if len(payload) > MAX_CONTROL_IMAGE_BYTES * 4 // 3 + 4:
        raise UserError(f"control_image is larger than {MAX_CONTROL_IMAGE_BYTES >> 20} MB; send a smaller image")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise UserError("control_image is not base64 (send the image file's bytes base64-encoded, or a data: URL)"
                        ) from None
    image = read_control_image(io.BytesIO(raw), what="control_image", max_size=control_size_limit(manifest))
    return _ControlImage(image, hashlib.sha256(raw).hexdigest())


def _control_request(extras: dict[str, Any]) -> Any:
    """The pipeline's ControlRequest from a request's parsed ControlNet fields (None without them)."""
    if "control_image" not in extras:
        return None
    from tstitch_trt.pipeline import control

    return control.ControlRequest(
        extras["control_image"].image, scale=extras.get("controlnet_scale", control.DEFAULT_CONTROLNET_SCALE),
        guess_mode=extras.get("guess_mode", False), start=extras.get("control_guidance_start",
                                                                   control.DEFAULT_GUIDANCE_START),
        end=extras.get("control_guidance_end", control.DEFAULT_GUIDANCE_END))


def _sd_open(bundle: Path, backend: str, precision: str = "auto") -> Any:
    from tstitch_trt.pipeline.sd import StitchedSDPipeline

    return StitchedSDPipeline.from_bundle(bundle, backend=backend, precision=precision)


def _sd_validate(pipe: Any, req: GenerateRequest) -> None:
    from tstitch_trt.pipeline import guidance
    from tstitch_trt.pipeline.control import check_control
    from tstitch_trt.sampling.sd_samplers import SD_SAMPLERS

    has_negative = any(n is not None for n in req.conditioning["negative_prompt"])
    if req.sampler in SD_SAMPLERS:
        guidance.check_guidance(pipe.manifest, req.sampler, req.cfg_scale, has_negative)
    c = req.conditioning
    texts = [("prompt", p) for p in c["prompt"]] + [("negative_prompt", n) for n in c["negative_prompt"]]
    pipe.validate(req.ratio, req.fractions, req.steps, req.sampler, req.height, req.width, req.num_images,
                  cfg_scale=req.cfg_scale, eta=req.eta, seed=req.seed, texts=texts)
    control = _control_request(req.extras)
    check_control(pipe.manifest.controlnet is not None, control)
    if control is not None:
        control.check(req.height, req.width)
    lo, hi = pipe.manifest.batch_limits(pipe.backend.name)
    if not lo <= req.num_images <= hi:  # the DiT pipeline's check, word for word
        raise UserError(f"batch {req.num_images} is outside the range this bundle was built for on "
                        f"{pipe.backend.name} [{lo}, {hi}]; split the request, or rebuild with --batch-sizes "
                        f"{lo}-{max(req.num_images, hi)}")


def _expand(texts: Sequence[str], n: int) -> list[str]:
    return [t for t in texts for _ in range(n)]  # diffusers: each prompt num_images times in a row


def _batch_negatives(pipe: Any, negatives: list[str | None]) -> list[str | None] | None:
    """The batch's negative prompts as one call takes them: None where no request gave one (the pipeline's own
    rule then); else per row, a request without one batched with one that has: SD encodes "" (diffusers), SDXL
    keeps None (zeros under force_zeros_for_empty_prompt). LCM-guided bundles refuse negatives in validate."""
    if all(n is None for n in negatives):
        return None
    return ["" if n is None and pipe.manifest.pipeline == "sd" else n for n in negatives]


def _sd_run_batch(pipe: Any, reqs: Sequence[GenerateRequest],
                  cancel: threading.Event | None = None) -> list[RequestResult]:
    """One engine batch: each request's prompts repeated num_images times and its own seed's latents,
    concatenated in request order, split back (the text encoder and the U-Nets are per-row)."""
    first = reqs[0]
    prompts: list[str] = []
    negatives: list[str] = []
    inits, step_noises = [], []
    for r in reqs:
        c = r.conditioning
        prompts += _expand(c["prompt"], c["num_images"])
        negatives += _expand(c["negative_prompt"], c["num_images"])
        x, noise = pipe.request_noise(r.seed, r.num_images, r.height, r.width, r.steps, r.sampler, r.eta)
        inits.append(x)
        step_noises.append(noise)
    step_noise = None if step_noises[0] is None else np.concatenate(step_noises, axis=1)
    extras = {k: v for k, v in first.extras.items() if k in SDXL_FIELDS or k in CACHE_FIELDS}
    res = pipe(prompt=prompts, negative_prompt=_batch_negatives(pipe, negatives),
               num_images=1, ratio=first.ratio, fractions=first.fractions, steps=first.steps, sampler=first.sampler,
               cfg_scale=first.cfg_scale, seed=first.seed, eta=first.eta, init_noise=np.concatenate(inits, axis=0),
               step_noise=step_noise, progress=False, control=_control_request(first.extras), cancel=cancel,
               **extras)
    out, start = [], 0
    for r in reqs:
        stop = start + r.num_images
        c = r.conditioning
        negatives = res.report["negative_prompts"][start:stop]
        report = dict(res.report, prompts=[cut_text(p) for p in _expand(c["prompt"], c["num_images"])],
                      negative_prompts=[n if n is None else cut_text(n) for n in negatives], seed=r.seed,
                      batch=r.num_images, batch_size=len(prompts), ratio=first.ratio,
                      fractions=None if first.fractions is None else list(first.fractions))
        report["notes"] = [n for n in res.report["notes"] if not n.startswith("prompt ") or
                           any(shown(t) in n for t in (*c["prompt"], *c["negative_prompt"]) if t is not None)]
        images = [] if res.images is None else list(res.images[start:stop])
        latents = res.latents[start:stop].copy() if r.return_latents else None
        out.append(RequestResult(images, latents, report))
        start = stop
    return out


KINDS: dict[str, PipelineKind] = {
    "dit-class-conditional": PipelineKind(("class_labels",), _dit_defaults, _dit_open, _max_batch, _dit_parse,
                                          _dit_validate, _dit_run_batch),
    "sd": PipelineKind(TEXT_FIELDS, _sd_defaults, _sd_open, _max_batch, _sd_parse, _sd_validate,
                       _sd_run_batch),
    "sdxl": PipelineKind((*TEXT_FIELDS, *SDXL_FIELDS), _sd_defaults, _sd_open, _max_batch, _sd_parse, _sd_validate,
                         _sd_run_batch),
}
