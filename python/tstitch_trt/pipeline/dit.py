"""Class-conditional DiT pipeline: labels -> stitched loop -> (VAE decode) -> images + report.

    pipe = StitchedPipeline.from_bundle("engines/dit-s-xl", backend="auto")
    images, report = pipe(class_labels=[207, 360], ratio=0.4, steps=50, sampler="ddim", cfg_scale=1.5, seed=0)

A pipeline is reusable: the second call with the same batch and steps allocates nothing.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tstitch_trt.bundle.manifest import Manifest
from tstitch_trt.errors import UserError
from tstitch_trt.pipeline import values
from tstitch_trt.pipeline.backends import open_bundle, open_first_backend
from tstitch_trt.pipeline.caching import check_dit_cache
from tstitch_trt.pipeline.resources import available_memory_bytes, estimate_request_bytes
from tstitch_trt.runtime.backend import Backend
from tstitch_trt.runtime.loop import LoopResult, run_stitched
from tstitch_trt.sampling.cache_plan import cached_calls
from tstitch_trt.sampling.coefficients import SAMPLERS
from tstitch_trt.sampling.stitch import check_fractions, steps_per_model
from tstitch_trt.sampling.trajectory import TrajectoryPlan, plan_trajectory, sampler_needs_noise


@dataclass
class SampleResult:
    latents: np.ndarray  # (B, C, H, W) final latent, before decoding
    images: np.ndarray | None  # (B, H, W, C) uint8, or None without a VAE / pixel-space decode
    report: dict


class StitchedPipeline:
    def __init__(self, bundle_dir: str | Path, manifest: Manifest, backend: Backend, backend_reason: str):
        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest
        self.backend = backend
        self.backend_reason = backend_reason
        self._decoder = None

    @classmethod
    def from_bundle(cls, bundle_dir: str | Path, backend: str = "auto", device: str | None = None,
                    precision: str = "auto") -> StitchedPipeline:
        """Open a bundle directory (or "demo", the built-in pair) on `backend`.

        The whole bundle is verified first (schema, sealed paths, every checksum): a damaged bundle is
        an error whichever backend would run. auto moves to the next backend only when this machine
        cannot run an engine, and the report says which one ran and why. precision: auto, fp32 or
        bf16, for the CPU backend that has bf16 (openvino).
        """
        bundle_dir, manifest = open_bundle(bundle_dir)
        if manifest.text_to_image:
            raise UserError(f"{bundle_dir} is a text-to-image (sd) bundle; open it with "
                            "tstitch_trt.pipeline.sd.StitchedSDPipeline")
        opened, why = open_first_backend(bundle_dir, manifest, backend, device, precision)
        return cls(bundle_dir, manifest, opened, why)

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.manifest.models]

    def validate(self, labels: np.ndarray, ratio: float | None, fractions: Sequence[float] | None,
                 steps: int, sampler: str, x_init: np.ndarray | None, cfg_scale: float = 1.5, eta: float = 0.0,
                 seed: int = 0, cache_interval: object = 1, cache_branch: object = None) -> None:
        """Every request check, before any work; each failure is one line naming the value and the limit."""
        n_models = len(self.manifest.models)
        check_dit_cache(self.manifest, cache_interval, cache_branch)
        if sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        max_steps = self.num_timesteps
        if not isinstance(steps, int | np.integer) or not 1 <= steps <= max_steps:
            raise UserError(f"--steps must be an integer between 1 and {max_steps} (the schedule's timesteps), "
                            f"got {values.shown(steps)}")
        if fractions is not None:
            values.check_fractions_finite(fractions)
            try:
                check_fractions(fractions, n_models)
            except ValueError as e:
                raise UserError(str(e)) from None
        elif ratio is None:
            raise UserError("give --ratio (two models) or --fractions (one per model)")
        elif n_models != 2:
            raise UserError(
                f"--ratio stitches two models but the bundle has {n_models}; give --fractions with {n_models} values"
            )
        if ratio is not None and fractions is None:
            values.check_ratio(ratio)
        values.check_cfg_scale(cfg_scale)
        values.check_eta(eta)
        values.check_seed(int(seed) if isinstance(seed, np.integer) else seed)
        if len(labels) == 0:
            raise UserError("give at least one class label")
        nc = self.manifest.num_classes
        bad = [int(v) for v in labels if not 0 <= int(v) < nc]
        if bad:
            raise UserError(f"class label {bad[0]} is outside [0, {nc}); this bundle's models know {nc} classes")
        if x_init is not None:
            want = self.manifest.latent_shape
            if x_init.ndim != 4 or tuple(x_init.shape[1:]) != want:
                want_text = ", ".join(map(str, want))
                raise UserError(f"--init-noise has shape {tuple(x_init.shape)}, expected (B, {want_text})")
            if x_init.shape[0] != len(labels):
                raise UserError(f"--init-noise has batch {x_init.shape[0]} but {len(labels)} class labels were given")
            if not np.isfinite(x_init).all():
                raise UserError("--init-noise contains NaN or Inf")
        lo, hi = self.batch_range()
        b = len(labels)
        if not lo <= b <= hi:
            raise UserError(f"batch {b} is outside the range this bundle was built for on {self.backend.name} "
                            f"[{lo}, {hi}]; split the request, or rebuild with --batch-sizes {lo}-{max(b, hi)}")
        if self.backend.device == "cpu":
            need = estimate_request_bytes(self.manifest, b, steps, sampler_needs_noise(sampler, eta))
            have = available_memory_bytes()
            if have is not None and need > have:
                raise UserError(f"this request needs about {need / 2**30:.1f} GiB of memory (batch {b}, {steps} "
                                f"steps) but only {have / 2**30:.1f} GiB is available; use a smaller batch")

    def batch_range(self) -> tuple[int, int]:
        """The batch range the bundle was built for on this pipeline's backend (every backend is bounded)."""
        return self.manifest.batch_limits(self.backend.name)

    @property
    def num_timesteps(self) -> int:
        return int(self.manifest.schedule["num_timesteps"])

    def __call__(
        self,
        class_labels: Sequence[int],
        ratio: float | None = 0.4,
        steps: int = 50,
        sampler: str = "ddim",
        cfg_scale: float = 1.5,
        seed: int = 0,
        fractions: Sequence[float] | None = None,
        eta: float = 0.0,
        init_noise: np.ndarray | None = None,
        progress: bool | None = None,
        decode: bool = True,
        step_noise: np.ndarray | None = None,
        cancel: threading.Event | None = None,
        cache_interval: int = 1,
        cache_branch: int | None = None,
    ) -> SampleResult:
        """step_noise (steps, B, C, H, W): the per-step noise of ddpm / ddim eta>0, else drawn from `seed`.
        cancel: set by another thread to stop the loop before its next step (raises runtime.loop.Cancelled).
        cache_interval: FORA's interval N (1 = no caching; a bundle built with --cache-scheme fora): each model
        runs whole every N-th call, counted from its first call after a stitch switch, and reuses every block's
        attention and MLP outputs between; the report's "cache" lists the full calls. cache_branch: DeepCache's
        (SD) and refused here: FORA has none."""
        label_list = [int(v) for v in class_labels]
        nc = self.manifest.num_classes
        bad = [v for v in label_list if not 0 <= v < nc]
        if bad:  # before the int64 conversion, which would overflow on a huge label
            raise UserError(f"class label {bad[0]} is outside [0, {nc}); this bundle's models know {nc} classes")
        labels = np.asarray(label_list, dtype=np.int64)
        if init_noise is not None and init_noise.ndim == 4 and len(labels) == 1:
            labels = np.repeat(labels, init_noise.shape[0])  # one label for the whole --init-noise batch
        cache_interval = check_dit_cache(self.manifest, cache_interval, cache_branch)
        self.validate(labels, None if fractions is not None else ratio, fractions, steps, sampler, init_noise,
                      cfg_scale=cfg_scale, eta=eta, seed=seed, cache_interval=cache_interval)
        shape = (len(labels), *self.manifest.latent_shape)
        if init_noise is None:
            x_init, drawn = request_noise(seed, len(labels), self.manifest.latent_shape, steps, sampler, eta)
            step_noise = drawn if step_noise is None else step_noise
        else:
            x_init = init_noise.astype(np.float32)
        plan = plan_trajectory(sampler, steps, len(self.manifest.models), shape, np.random.default_rng(seed),
                               ratio=None if fractions is not None else ratio, fractions=fractions, eta=eta,
                               noise=step_noise, num_timesteps=self.num_timesteps)
        if cache_interval > 1:  # FORA's full / cached calls, per model from its first call after a switch
            plan = dataclasses.replace(plan, cached=cached_calls(plan.timesteps, plan.step_model, cache_interval))
        t0 = time.perf_counter()
        loop = run_stitched(self.backend, plan, x_init, labels, cfg_scale, progress=progress,
                            model_names=self.model_names, cancel=cancel)
        images, decode_s, decode_note = None, 0.0, None
        if decode:
            t1 = time.perf_counter()
            images, decode_note = self._decode(loop.x)
            decode_s = time.perf_counter() - t1
        total = time.perf_counter() - t0
        report = self._report(plan, loop, labels, cfg_scale, seed, total, decode_s, decode_note)
        report["cache"] = cache_report(plan, cache_interval) if cache_interval > 1 else None  # None: every call full
        return SampleResult(loop.x, images, report)

    def _decode(self, latents: np.ndarray) -> tuple[np.ndarray | None, str | None]:
        m = self.manifest
        if m.latent_scale_factor == 1.0 and m.vae is None:  # pixel-space models: the latent is the image
            return to_uint8(latents), None
        if m.vae is None:
            return None, "the bundle has no VAE (build with --vae DIR): it makes latents, not images"
        if self._decoder is None:
            from tstitch_trt.pipeline.vae import open_decoder

            self._decoder = open_decoder(self.bundle_dir, m, self.backend.name)
        return to_uint8(self._decoder(latents / m.latent_scale_factor)), None

    def _report(self, plan: TrajectoryPlan, loop: LoopResult, labels: np.ndarray, cfg: float, seed: int,
                total: float, decode_s: float, decode_note: str | None) -> dict:
        n = len(self.manifest.models)
        return {
            "backend": self.backend.name,
            "backend_reason": self.backend_reason,
            "device": self.backend.device,
            "precision": getattr(self.backend, "precisions", None),  # per model, where the backend chooses it
            "models": self.model_names,
            "sampler": plan.sampler,
            "steps": plan.steps,
            "timesteps": plan.timesteps.tolist(),
            "step_model": plan.step_model.tolist(),
            "steps_per_model": steps_per_model(plan.step_model, n),
            "batch": int(len(labels)),
            "class_labels": labels.tolist(),
            "cfg_scale": cfg,
            "seed": seed,
            "loop_mode": loop.mode,
            "step_ms": [round(v, 4) for v in loop.step_ms],
            "engine_ms": None if loop.engine_ms is None else [round(v, 4) for v in loop.engine_ms],
            "host_overhead_ms_per_step": loop.host_overhead_ms_per_step,
            "loop_seconds": loop.total_seconds,
            "decode_seconds": decode_s,
            "total_seconds": total,
            "notes": loop.notes + ([decode_note] if decode_note else []),
        }

    def close(self) -> None:
        self.backend.close()


def cache_report(plan: TrajectoryPlan, interval: int) -> dict:
    """FORA's plan as the report shows it: which calls ran the full step graphs, which the cached ones."""
    cached = plan.cached if plan.cached is not None else np.zeros(plan.steps, dtype=bool)
    return {"scheme": "fora", "interval": interval,
            "full_calls": [i for i in range(plan.steps) if not cached[i]],
            "cached_calls": [i for i in range(plan.steps) if cached[i]]}


def decodes_to_images(manifest: Manifest) -> bool:
    """Whether samples of this bundle become images: pixel-space models, or a bundle with a VAE."""
    return manifest.vae is not None or manifest.latent_scale_factor == 1.0


def request_noise(seed: int, batch: int, latent_shape: Sequence[int], steps: int, sampler: str,
                  eta: float) -> tuple[np.ndarray, np.ndarray | None]:
    """(x_init, step_noise) exactly as a call with this seed and batch draws them: a served batch
    concatenates each request's own (axis 0 / axis 1), so its images do not depend on its batch mates."""
    rng = np.random.default_rng(seed)
    shape = (batch, *latent_shape)
    x_init = rng.standard_normal(shape, dtype=np.float32)
    noise = rng.standard_normal((steps, *shape), dtype=np.float32) if sampler_needs_noise(sampler, eta) else None
    return x_init, noise


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    x = np.clip((images + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return x.transpose(0, 2, 3, 1)


def image_grid(images: np.ndarray, nrow: int) -> np.ndarray:
    """(B, H, W, C) uint8 -> one (rows*H + pad, nrow*W + pad, C) grid with 2 px borders."""
    b, h, w, c = images.shape
    rows = -(-b // nrow)
    pad = 2
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), np.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = images[i]
    return grid
