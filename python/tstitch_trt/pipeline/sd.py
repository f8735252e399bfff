"""Text-to-image SD 1.x / SDXL pipeline: prompt -> text encoder(s) (once) -> stitched U-Net loop -> VAE -> images.

    pipe = StitchedSDPipeline.from_bundle("engines/bk-tiny-sd15", backend="auto")
    res = pipe(prompt="a photo of a cat", ratio=0.4, steps=50, cfg_scale=7.5, seed=0)

Semantics are diffusers' StableDiffusionPipeline's: no negative prompt encodes ""; context is
(2B, L, D), uncond half first; init_noise is the unit-Gaussian latent (like diffusers' `latents=`)
and is scaled by the sampler's init_noise_sigma; the stitch follows the T-Stitch SD rule by U-Net
call index ((i + 1) / n_calls <= ratio). Same names as StitchedPipeline (DiT) where the meaning is
the same; the result is the same SampleResult.

SDXL bundles follow diffusers' StableDiffusionXLPipeline: context = both encoders' penultimate hidden
states concatenated, text_embeds = text_encoder_2's pooled output, time_ids = original size + crop
top-left + target size (defaults (height, width), (0, 0), (height, width); the negative half the same
unless given); no negative prompt and force_zeros_for_empty_prompt: zero uncond embeddings.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tstitch_trt.bundle.manifest import Manifest
from tstitch_trt.errors import UserError
from tstitch_trt.pipeline import guidance as lcm_guidance
from tstitch_trt.pipeline import values
from tstitch_trt.pipeline.backends import open_bundle, open_first_backend
from tstitch_trt.pipeline.caching import check_cache
from tstitch_trt.pipeline.control import ControlRequest, check_control
from tstitch_trt.pipeline.dit import SampleResult, to_uint8
from tstitch_trt.runtime.backend import Backend
from tstitch_trt.runtime.loop import run_stitched
from tstitch_trt.sampling.cache_plan import cached_calls
from tstitch_trt.sampling.sd_samplers import SD_SAMPLERS, default_sampler, draw_step_noise, sd_needs_noise, sd_table
from tstitch_trt.sampling.stitch import check_fractions, steps_per_model, stitch_schedule_by_call
from tstitch_trt.sampling.trajectory import TrajectoryPlan


class StitchedSDPipeline:
    def __init__(self, bundle_dir: str | Path, manifest: Manifest, backend: Backend, backend_reason: str,
                 precision: str = "auto"):
        from tstitch_trt.pipeline.precision import aux_precisions, unet_precisions

        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest
        self.backend = backend
        self.backend_reason = backend_reason
        # the precision of every part: U-Nets (the backend's choice), text encoder(s) and VAE (each by its verdict)
        aux, self.aux_precision_reason = aux_precisions(manifest, backend, precision)
        self.precisions: dict[str, str] = {**unet_precisions(manifest, backend), **aux}
        self._tokenizer = None
        self._text_encoder = None
        self._sdxl_text = None  # (tokenizer, text encoder, tokenizer_2, text_encoder_2) of an sdxl bundle
        self._decoder = None

    @classmethod
    def from_bundle(cls, bundle_dir: str | Path, backend: str = "auto", device: str | None = None,
                    precision: str = "auto") -> StitchedSDPipeline:
        """precision: auto, fp32 or bf16, for every part (U-Nets, text encoders, VAE) on the CPU backend with bf16
        (openvino); auto uses bf16 for a part only where the bundle records it as safe on this CPU's bf16 ISA.
        Other backends take auto or fp32 and run their artifacts' precision (bf16 is one line, exit 2)."""
        bundle_dir, manifest = open_bundle(bundle_dir)  # schema, sealed paths, every checksum
        if not manifest.text_to_image:
            raise UserError(f"{bundle_dir} is a {manifest.pipeline} bundle, not a text-to-image (sd, sdxl) bundle")
        from tstitch_trt.pipeline.backends import backend_candidates
        from tstitch_trt.pipeline.resources import check_sd_fits

        # before any weights load: the default size at batch 1 (a larger request is checked again in validate)
        kinds = [k for k, _ in backend_candidates(manifest, backend, precision)]
        check_sd_fits(bundle_dir, manifest, kinds, 1, manifest.image_size, manifest.image_size)
        opened, why = open_first_backend(bundle_dir, manifest, backend, device, precision)
        return cls(bundle_dir, manifest, opened, why, precision)

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.manifest.models]

    @property
    def vae_factor(self) -> int:
        return self.manifest.image_size // self.manifest.latent_shape[1]

    @property
    def default_sampler(self) -> str:
        return default_sampler(self.manifest.scheduler or {})

    def _unet_down_factor(self) -> int:
        return max(2 ** (len(m.arch.get("block_out_channels", [0])) - 1) for m in self.manifest.models)

    def validate(self, ratio: float | None, fractions: Sequence[float] | None, steps: int, sampler: str,
                 height: int, width: int, batch: int, cfg_scale: float | None = None, eta: float = 0.0,
                 seed: int = 0, texts: Sequence[tuple[str, str | None]] = ()) -> None:
        """Every request check before any work (run and serve both call this; one line each). texts: (flag,
        text) pairs of the prompts and negative prompts."""
        n_models = len(self.manifest.models)
        if sampler not in SD_SAMPLERS:
            raise UserError(f"unknown sampler {sampler!r} for an SD bundle; choose one of {', '.join(SD_SAMPLERS)}")
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
            raise UserError(f"--steps must be between 1 and 1000, got {values.shown(steps)}")
        values.check_seed(seed)
        values.check_eta(eta)
        if cfg_scale is not None:
            values.check_cfg_scale(cfg_scale)
        for flag, text in texts:
            if text is not None:
                values.check_text(flag, text)
        # the sampler's own limits (eta off ddim, steps past an offset schedule, LCM's original steps)
        sd_table(sampler, self.manifest.scheduler or {}, steps, eta)
        if fractions is not None:
            values.check_fractions_finite(fractions)
            try:
                check_fractions(fractions, n_models)
            except ValueError as e:
                raise UserError(str(e)) from None
        elif ratio is None:
            raise UserError("give --ratio (two models) or --fractions (one per model)")
        elif not 0.0 <= ratio <= 1.0:  # NaN fails this too
            raise UserError(f"--ratio must be in [0, 1] (the share of early U-Net calls on the small model), "
                            f"got {ratio}")
        elif n_models != 2:
            raise UserError(f"--ratio stitches two models but the bundle has {n_models}; give --fractions with "
                            f"{n_models} values")
        f = self.vae_factor
        for name, v in (("--height", height), ("--width", width)):
            if v <= 0 or v % f:
                raise UserError(f"{name} {v} is not a positive multiple of the VAE factor {f}")
        down = f * self._unet_down_factor()
        if height % down or width % down:
            raise UserError(f"--height/--width {height}x{width} must be multiples of {down} (VAE factor {f} x the "
                            f"U-Nets' {self._unet_down_factor()}x downsampling)")
        if batch < 1:
            raise UserError("give at least one prompt and --num-images >= 1")
        # every backend is held to the sizes the bundle was built for (engines could not run others)
        lo, hi = self.manifest.batch_limits(self.backend.name)
        if not lo <= batch <= hi:
            raise UserError(f"batch {batch} (prompts x --num-images) is outside the range this bundle was built "
                            f"for on {self.backend.name} [{lo}, {hi}]; split the request, or rebuild with "
                            f"--batch-sizes {lo}-{max(batch, hi)}")
        if self.backend.device == "cpu":  # the weights are loaded: what the request's activations need on top
            from tstitch_trt.pipeline.resources import available_memory_bytes, unet_activation_bytes

            need = max(unet_activation_bytes(m.arch, batch, height, width, f) for m in self.manifest.models)
            have = available_memory_bytes()
            if have is not None and need > have:
                raise UserError(f"a {height}x{width} batch-{batch} request needs about {need / 2**30:.1f} GiB of "
                                f"working memory but only {have / 2**30:.1f} GiB is available; use a smaller size "
                                "or batch")
        ranges = self.manifest.io.get("dim_ranges", {})
        for name, dim, v in (("--height", "H", height), ("--width", "W", width)):
            if dim in ranges and not ranges[dim][0] * f <= v <= ranges[dim][2] * f:
                raise UserError(f"{name} {v} is outside the sizes this bundle was built for "
                                f"[{ranges[dim][0] * f}, {ranges[dim][2] * f}]")

    @property
    def sdxl(self) -> bool:
        return self.manifest.pipeline == "sdxl"

    def encode_prompts(self, prompts: Sequence[str], negative: Sequence[str | None],
                       time_ids: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], list[str]]:
        """The step graphs' text conditioning by input name ({"context": (2B, L, D)}, uncond (negative) half
        first; sdxl: + "text_embeds" (2B, P), "time_ids" (2B, 6); under "embedding" guidance (LCM) B rows each,
        the prompts only), and notes (truncated prompts).

        A None negative: no negative prompt (SD: "" as diffusers; SDXL with force_zeros_for_empty_prompt:
        zero embeddings). time_ids (sdxl): (2, 6), the negative row first; default: the bundle's image size."""
        if self.manifest.guidance_mode == "embedding":
            lcm_guidance.check_negative_prompt(self.manifest, any(negative))
            negative = []
        if self.sdxl:
            return self._encode_sdxl(prompts, negative, time_ids)
        negative = ["" if n is None else n for n in negative]
        if self._tokenizer is None:
            from tstitch_trt.pipeline.text import PromptTokenizer
            from tstitch_trt.pipeline.text_encoder import open_text_encoder

            if self.manifest.tokenizer is None:
                raise UserError("the bundle has no tokenizer; rebuild it from a full SD pipeline directory")
            self._tokenizer = PromptTokenizer(self.bundle_dir, self.manifest.tokenizer)
            self._text_encoder = open_text_encoder(self.bundle_dir, self.manifest, self.backend.name,
                                                   self.precisions["text encoder"])
        ids, cut = self._tokenizer(list(negative) + list(prompts))
        notes = [f"prompt {values.shown(text)} is longer than {self._tokenizer.max_length} tokens and was truncated "
                 "(as diffusers does)" for text, c in zip(list(negative) + list(prompts), cut, strict=True) if c]
        assert self._text_encoder is not None
        context = np.ascontiguousarray(self._text_encoder(ids), dtype=np.float32)
        return {"context": context}, list(dict.fromkeys(notes))

    def _encode_sdxl(self, prompts: Sequence[str], negative: Sequence[str | None], time_ids: np.ndarray | None
                     ) -> tuple[dict[str, np.ndarray], list[str]]:
        if self._sdxl_text is None:
            from tstitch_trt.pipeline.text import PromptTokenizer
            from tstitch_trt.pipeline.text_encoder import open_text_encoder_outputs
            from tstitch_trt.runtime.ort_backend import maps_weights

            m = self.manifest
            mapped = maps_weights(self.bundle_dir, m)
            if not (m.tokenizer and m.tokenizer_2 and m.text_encoder and m.text_encoder_2):
                raise UserError("the sdxl bundle lacks a tokenizer or text encoder; rebuild it from a full "
                                "StableDiffusionXLPipeline directory")
            self._sdxl_text = (PromptTokenizer(self.bundle_dir, m.tokenizer),
                               open_text_encoder_outputs(self.bundle_dir, m.text_encoder, self.backend.name,
                                                         self.precisions["text encoder"], mapped=mapped),
                               PromptTokenizer(self.bundle_dir, m.tokenizer_2),
                               open_text_encoder_outputs(self.bundle_dir, m.text_encoder_2, self.backend.name,
                                                         self.precisions["text encoder 2"], mapped=mapped))
        tok, enc, tok_2, enc_2 = self._sdxl_text
        zeros = bool((self.manifest.conditioning or {}).get("force_zeros_for_empty_prompt", True))
        texts = ["" if n is None else n for n in negative] + list(prompts)
        (ids, cut), (ids_2, cut_2) = tok(texts), tok_2(texts)
        notes = [f"prompt {values.shown(text)} is longer than {tok.max_length} tokens and was truncated (as diffusers "
                 "does)"
                 for text, c, c2 in zip(texts, cut, cut_2, strict=True) if c or c2]
        out, out_2 = enc(ids), enc_2(ids_2)
        # both encoders' penultimate hidden states (raw, as the bundle's graphs output them), concatenated
        context = np.concatenate([out["text_embeddings"], out_2["text_embeddings"]], axis=-1).astype(np.float32)
        pooled = np.asarray(out_2["text_embeds"], dtype=np.float32)
        if zeros:  # diffusers: no negative prompt and force_zeros_for_empty_prompt -> zero uncond embeddings
            for i, n in enumerate(negative):
                if n is None:
                    context[i] = 0
                    pooled[i] = 0
        b = len(prompts)
        if time_ids is None:
            time_ids = self.sdxl_time_ids(self.manifest.image_size, self.manifest.image_size)
        halves = np.asarray(time_ids, dtype=np.float32).reshape(2, 6)
        # B negative rows, then B positive ones; "embedding" guidance (no negatives): the positive ones only
        rows = np.repeat(halves if len(negative) else halves[1:], b, axis=0)
        cond = {"context": np.ascontiguousarray(context), "text_embeds": np.ascontiguousarray(pooled),
                "time_ids": rows}
        return cond, list(dict.fromkeys(notes))

    @staticmethod
    def sdxl_time_ids(height: int, width: int, original_size: Sequence[int] | None = None,
                      crop_coords: Sequence[int] | None = None, target_size: Sequence[int] | None = None,
                      negative_original_size: Sequence[int] | None = None,
                      negative_crop_coords: Sequence[int] | None = None,
                      negative_target_size: Sequence[int] | None = None) -> np.ndarray:
        """(2, 6) float32: the negative then the positive (original size, crop top-left, target size), with
        diffusers' defaults: (height, width), (0, 0), (height, width); the negative row equals the positive
        unless a negative original AND target size are given (diffusers' rule)."""
        for name, v in (("--original-size", original_size), ("--crop-coords", crop_coords),
                        ("--target-size", target_size), ("negative original size", negative_original_size),
                        ("negative crop coords", negative_crop_coords), ("negative target size", negative_target_size)):
            if v is not None and (len(v) != 2 or any(int(x) != x or not 0 <= x <= 65536 for x in v)):
                raise UserError(f"{name} must be two whole numbers in [0, 65536], got {list(v)}")
            if v is not None and "crop" not in name and min(v) < 1:
                raise UserError(f"{name} must be two positive sizes (height width), got {list(v)}")
        pos = [*(original_size or (height, width)), *(crop_coords or (0, 0)), *(target_size or (height, width))]
        neg = pos
        if negative_original_size is not None and negative_target_size is not None:
            neg = [*negative_original_size, *(negative_crop_coords or (0, 0)), *negative_target_size]
        return np.array([neg, pos], dtype=np.float32)

    def plan(self, sampler: str, steps: int, batch_shape: tuple[int, ...], rng: np.random.Generator,
             ratio: float | None, fractions: Sequence[float] | None, eta: float,
             step_noise: np.ndarray | None = None) -> tuple[TrajectoryPlan, float]:
        table = sd_table(sampler, self.manifest.scheduler or {}, steps, eta)
        n_calls = len(table.timesteps)
        try:
            step_model = stitch_schedule_by_call(n_calls, len(self.manifest.models), ratio=ratio, fractions=fractions)
        except ValueError as e:
            raise UserError(str(e)) from None
        noise = None
        if sd_needs_noise(sampler, eta):
            noise = step_noise if step_noise is not None else draw_step_noise(sampler, n_calls, batch_shape, rng)
        return TrajectoryPlan(sampler, table.timesteps, table.coef, step_model, noise), table.init_noise_sigma

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_images: int = 1,
        ratio: float | None = 0.4,
        steps: int | None = None,
        sampler: str | None = None,
        cfg_scale: float | None = None,
        seed: int = 0,
        fractions: Sequence[float] | None = None,
        height: int | None = None,
        width: int | None = None,
        eta: float = 0.0,
        init_noise: np.ndarray | None = None,
        progress: bool | None = None,
        decode: bool = True,
        step_noise: np.ndarray | None = None,
        original_size: Sequence[int] | None = None,
        crop_coords: Sequence[int] | None = None,
        target_size: Sequence[int] | None = None,
        negative_original_size: Sequence[int] | None = None,
        negative_crop_coords: Sequence[int] | None = None,
        negative_target_size: Sequence[int] | None = None,
        control: ControlRequest | None = None,
        cache_interval: int = 1,
        cache_branch: int | None = None,
        cancel: threading.Event | None = None,
    ) -> SampleResult:
        """step_noise (U-Net calls, B, C, h, w): the per-call noise of ddim eta>0 and lcm, else drawn from `seed`.
        steps / cfg_scale left out: pipeline/guidance.py's defaults (50 / SD 7.5, SDXL 5.0; lcm 4 / 8.5, or 1.0
        where a U-Net lacks the guidance embedding). original_size .. negative_target_size: SDXL's time ids
        (diffusers' names; (height, width) and (top, left) pairs). control: the ControlNet's image and
        settings (bundles built with --controlnet need one). cache_interval / cache_branch: DeepCache's
        (pipeline/caching.py; 1 = no caching); the report's "cache" lists the full calls. cancel: set by another
        thread to stop the loop before its next U-Net call (raises runtime.loop.Cancelled)."""
        check_control(self.manifest.controlnet is not None, control)
        cache_interval, cache_branch = check_cache(self.manifest, cache_interval, cache_branch)
        sampler = sampler or self.default_sampler
        steps = lcm_guidance.default_steps(sampler) if steps is None else steps
        if cfg_scale is None:
            cfg_scale = lcm_guidance.default_cfg_scale(self.manifest, sampler)
        if sampler in SD_SAMPLERS:  # an unknown one is refused by validate, with the list
            lcm_guidance.check_guidance(self.manifest, sampler, cfg_scale, negative_prompt is not None)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        sizes = (original_size, crop_coords, target_size, negative_original_size, negative_crop_coords,
                 negative_target_size)
        if not self.sdxl and any(v is not None for v in sizes):
            raise UserError("--original-size, --crop-coords and --target-size apply to SDXL bundles; this is an "
                            f"{self.manifest.pipeline} bundle")
        negatives: list[str | None]
        if negative_prompt is None:
            # SDXL tells "no negative prompt" (zeros under force_zeros_for_empty_prompt) from ""; SD encodes ""
            negatives = [None if self.sdxl else ""] * len(prompts)
        elif isinstance(negative_prompt, str):
            negatives = [negative_prompt] * len(prompts)
        else:
            negatives = list(negative_prompt)
            if len(negatives) != len(prompts):
                raise UserError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one per prompt")
        c = self.manifest.latent_shape[0]
        if init_noise is not None:
            if init_noise.ndim != 4 or init_noise.shape[1] != c:
                raise UserError(f"--init-noise has shape {tuple(init_noise.shape)}, expected (B, {c}, H/"
                                f"{self.vae_factor}, W/{self.vae_factor})")
            batch = init_noise.shape[0]
            if len(prompts) == 1:  # the latent sets the batch, the prompt repeated
                prompts, negatives, num_images = prompts * batch, negatives * batch, 1
            if len(prompts) * num_images != batch:
                raise UserError(f"--init-noise has batch {batch} but {len(prompts)} prompts x {num_images} images "
                                "were asked for")
            height, width = init_noise.shape[2] * self.vae_factor, init_noise.shape[3] * self.vae_factor
        if control is not None:  # the control image sets the size not given
            control.check_sets_size(height, width, self.vae_factor * self._unet_down_factor())
            height, width = height or control.height, width or control.width
        height = height or self.manifest.image_size
        width = width or self.manifest.image_size
        batch = len(prompts) * num_images
        texts = [("--prompt", p) for p in prompts] + [("--negative-prompt", n) for n in negatives]
        self.validate(None if fractions is not None else ratio, fractions, steps, sampler, height, width, batch,
                      cfg_scale=cfg_scale, eta=eta, seed=seed, texts=texts)
        if control is not None:
            control.check(height, width)
        # diffusers repeats each prompt's embedding num_images times in a row
        prompts = [p for p in prompts for _ in range(num_images)]
        negatives = [n for n in negatives for _ in range(num_images)]
        time_ids = self.sdxl_time_ids(height, width, *sizes) if self.sdxl else None
        t0 = time.perf_counter()
        cond, notes = self.encode_prompts(prompts, negatives, time_ids)
        encode_s = time.perf_counter() - t0
        low_memory = bool(getattr(self.backend, "one_model_at_a_time", False))
        if low_memory:  # the text encoders' compiled copies go before the first step model's comes (reopened per run)
            self._tokenizer = self._text_encoder = self._sdxl_text = None
            notes.append("text encoders released after encoding, the step models before decoding (one model in "
                         "memory at a time)")
        rng = np.random.default_rng(seed)
        shape = (batch, c, height // self.vae_factor, width // self.vae_factor)
        x_unit = (np.asarray(init_noise, dtype=np.float32) if init_noise is not None
                  else rng.standard_normal(shape, dtype=np.float32))
        plan, sigma = self.plan(sampler, steps, shape, rng,
                                None if fractions is not None else ratio, fractions, eta, step_noise)
        x_init = x_unit * np.float32(sigma)
        if cache_interval > 1:  # DeepCache's full / cached calls, per model from its first call after a switch
            plan = dataclasses.replace(plan, cached=cached_calls(plan.timesteps, plan.step_model, cache_interval))
        if control is not None:  # the image and guess mode per request, the scale per U-Net call
            cond = {**cond, **control.request_arrays(batch)}
            plan = dataclasses.replace(plan, tables={**plan.tables, "control_scale": control.scale_row(plan.steps)})
        guidance = lcm_guidance.graph_guidance(self.manifest, cfg_scale)
        if cfg_scale < 1 and self.manifest.guidance_mode == "cfg":
            notes.append(f"cfg {cfg_scale} <= 1 means no guidance (as diffusers): the conditional prediction alone")
        loop = run_stitched(self.backend, plan, x_init, cond, guidance, progress=progress,
                            model_names=self.model_names, cancel=cancel)
        if low_memory:
            self.backend.release_step_models()  # type: ignore[attr-defined]
        images, decode_s = None, 0.0
        if decode:
            t1 = time.perf_counter()
            images = self.decode(loop.x)
            decode_s = time.perf_counter() - t1
        total = time.perf_counter() - t0
        n = len(self.manifest.models)
        report = {
            "pipeline": self.manifest.pipeline,
            "backend": self.backend.name,
            "backend_reason": self.backend_reason,
            "device": self.backend.device,
            "models": self.model_names,
            "sampler": plan.sampler,
            "steps": steps,
            "unet_calls": plan.steps,
            "timesteps": [float(t) for t in plan.timesteps],
            "step_model": plan.step_model.tolist(),
            "steps_per_model": steps_per_model(plan.step_model, n),  # U-Net calls per model
            "batch": batch,
            "prompts": prompts,
            "negative_prompts": negatives if self.manifest.guidance_mode == "cfg" else [],
            "height": height,
            "width": width,
            "cfg_scale": cfg_scale,
            "guidance": self.manifest.guidance_mode,
            **({"time_ids": time_ids.tolist()} if time_ids is not None else {}),
            "seed": seed,
            "loop_mode": loop.mode,
            "step_ms": [round(v, 4) for v in loop.step_ms],
            "engine_ms": None if loop.engine_ms is None else [round(v, 4) for v in loop.engine_ms],
            "host_overhead_ms_per_step": loop.host_overhead_ms_per_step,
            "text_encoder_seconds": encode_s,
            "loop_seconds": loop.total_seconds,
            "decode_seconds": decode_s,
            "total_seconds": total,
            "precisions": self.precisions,  # every part: U-Nets, text encoder(s), VAE decoder
            "notes": notes + loop.notes + ([f"openvino precision (text encoders, VAE): {self.aux_precision_reason}"]
                                           if self.aux_precision_reason else []),
        }
        if cache_branch is not None:
            cached = plan.cached if plan.cached is not None else np.zeros(plan.steps, dtype=bool)
            report["cache"] = {"scheme": "deepcache", "interval": cache_interval, "branch": cache_branch,
                               "full_calls": [i for i in range(plan.steps) if not cached[i]],
                               "cached_calls": [i for i in range(plan.steps) if cached[i]]}
        else:
            report["cache"] = None  # no caching: every call full
        if control is not None:
            report["controlnet"] = {"scale": control.scale, "guess_mode": control.guess_mode,
                                    "guidance_start": control.start, "guidance_end": control.end,
                                    "control_scale": [float(v) for v in plan.tables["control_scale"]]}
        return SampleResult(loop.x, images, report)

    def request_noise(self, seed: int, batch: int, height: int, width: int, steps: int, sampler: str,
                      eta: float) -> tuple[np.ndarray, np.ndarray | None]:
        """(unit init latent, step noise) exactly as a call with this seed and batch draws them: a served
        batch concatenates each request's own (axis 0 / axis 1), so its images do not depend on its batch mates."""
        rng = np.random.default_rng(seed)
        shape = (batch, self.manifest.latent_shape[0], height // self.vae_factor, width // self.vae_factor)
        x_unit = rng.standard_normal(shape, dtype=np.float32)
        if not sd_needs_noise(sampler, eta):
            return x_unit, None
        n_calls = len(sd_table(sampler, self.manifest.scheduler or {}, steps, eta).timesteps)
        return x_unit, draw_step_noise(sampler, n_calls, shape, rng)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Final latents -> (B, H, W, 3) uint8 with the bundle's VAE (latents / scaling factor)."""
        if self.manifest.vae is None:
            raise UserError("the bundle has no VAE; rebuild it from a full SD pipeline directory")
        if self._decoder is None:
            from tstitch_trt.pipeline.vae import open_decoder

            self._decoder = open_decoder(self.bundle_dir, self.manifest, self.backend.name,
                                         self.precisions["VAE decoder"])
        return to_uint8(self._decoder(latents / np.float32(self.manifest.latent_scale_factor)))

    def close(self) -> None:
        self.backend.close()
