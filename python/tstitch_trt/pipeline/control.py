"""A ControlNet request: the control image and the per-call control scale, as diffusers computes them.

No torch (the runtime path stays torch-free): the image is read with PIL, converted to RGB and scaled
to [0, 1] as diffusers' control image processor does (VaeImageProcessor(do_convert_rgb=True,
do_normalize=False)), then repeated over the batch. It is never resized: its size must be the
request's --height x --width (when those are not given, the image sets them).

Per U-Net call i of n, diffusers keeps the ControlNet where start <= i / n and (i + 1) / n <= end
(StableDiffusion(XL)ControlNetPipeline's controlnet_keep) and scales its residuals by
conditioning_scale x keep: that row is the step graphs' control_scale (TrajectoryPlan.tables).
Guess mode is a request constant (control_guess 0 / 1) the step graphs read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from tstitch_trt.errors import UserError

DEFAULT_CONTROLNET_SCALE = 1.0  # diffusers' controlnet_conditioning_scale
DEFAULT_GUIDANCE_START, DEFAULT_GUIDANCE_END = 0.0, 1.0  # diffusers' control_guidance_start / _end


@dataclass(frozen=True)
class ControlRequest:
    """What a ControlNet run needs besides the prompt: the image (3, H, W) in [0, 1] and the knobs."""

    image: np.ndarray
    scale: float = DEFAULT_CONTROLNET_SCALE
    guess_mode: bool = False
    start: float = DEFAULT_GUIDANCE_START
    end: float = DEFAULT_GUIDANCE_END

    @property
    def height(self) -> int:
        return int(self.image.shape[1])

    @property
    def width(self) -> int:
        return int(self.image.shape[2])

    def check(self, height: int, width: int) -> None:
        """One line for a window diffusers refuses, or an image of another size than the request's."""
        if not np.isfinite(self.scale):
            raise UserError(f"--controlnet-scale must be a finite number, got {self.scale}")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise UserError(f"--control-guidance-start {self.start} and --control-guidance-end {self.end} must "
                            "satisfy 0 <= start < end <= 1")
        if (self.height, self.width) != (height, width):
            raise UserError(f"the control image is {self.height}x{self.width} (HxW) but the request is {height}x"
                            f"{width}; give an image of the output size, or drop --height/--width to take the "
                            "image's size")

    def check_sets_size(self, height: int | None, width: int | None, multiple: int) -> None:
        """Where the image sets the output size (no --height / --width), that size must suit the U-Nets."""
        sets = [v for v, given in ((self.height, height), (self.width, width)) if given is None]
        if any(v % multiple for v in sets):
            raise UserError(f"the control image is {self.height}x{self.width} (HxW) and sets the output size, which "
                            f"must be a multiple of {multiple} (VAE factor x U-Net downsampling); resize the image")

    def request_arrays(self, batch: int) -> dict[str, np.ndarray]:
        """The step graphs' control_image (B, 3, H, W) and control_guess ()."""
        image = np.ascontiguousarray(np.repeat(self.image[None], batch, axis=0), dtype=np.float32)
        return {"control_image": image, "control_guess": np.asarray(1.0 if self.guess_mode else 0.0, np.float32)}

    def scale_row(self, n_calls: int) -> np.ndarray:
        """control_scale per U-Net call: conditioning scale x diffusers' keep."""
        return (np.float32(self.scale) * control_keep(n_calls, self.start, self.end)).astype(np.float32)


def control_keep(n_calls: int, start: float, end: float) -> np.ndarray:
    """diffusers' controlnet_keep: 1 where the ControlNet acts at call i of n_calls, else 0."""
    i = np.arange(n_calls, dtype=np.float64)
    off = (i / n_calls < start) | ((i + 1) / n_calls > end)
    return np.where(off, 0.0, 1.0).astype(np.float32)


MAX_CONTROL_SIDE = 16384  # run's --height / --width bound: an image past it could never be the output size


def control_size_limit(manifest) -> tuple[int, int]:  # manifest: Manifest
    """The largest (height, width) this bundle makes: its engines' size ranges (latent units) x the VAE factor;
    a control image declaring more is refused from its header, before it is decoded."""
    factor = max(1, manifest.image_size // manifest.latent_shape[1])
    ranges = manifest.io.get("dim_ranges", {})
    h = ranges["H"][2] * factor if "H" in ranges else MAX_CONTROL_SIDE
    w = ranges["W"][2] * factor if "W" in ranges else MAX_CONTROL_SIDE
    return min(h, MAX_CONTROL_SIDE), min(w, MAX_CONTROL_SIDE)


def read_control_image(path: str | Path | BinaryIO, what: str = "--control-image",
                       max_size: tuple[int, int] = (MAX_CONTROL_SIDE, MAX_CONTROL_SIDE)) -> np.ndarray:
    """(3, H, W) float32 in [0, 1]: RGB, value / 255, as diffusers' control image processor. `path` may be an
    open binary file (serve's decoded upload); `what` names it in errors. The size the file declares is
    checked against max_size (control_size_limit) from its header, before any pixel is decoded: a 20 KB
    PNG declaring 10000x10000 would otherwise take gigabytes."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    name = f"{what} {path}" if isinstance(path, str | Path) else what
    try:
        with warnings.catch_warnings():  # PIL's DecompressionBombWarning: the size check below says it in one line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            width, height = img.size  # from the header only
            if height > max_size[0] or width > max_size[1] or height < 1 or width < 1:
                raise UserError(f"{name} declares {height}x{width} (HxW) pixels; this bundle makes images of at "
                                f"most {max_size[0]}x{max_size[1]}: give an image of the output size")
            rgb = img.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"{name} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{name} is not an image PIL can read ({str(e).splitlines()[0][:120]})") from None
    return np.ascontiguousarray((np.asarray(rgb).astype(np.float32) / 255.0).transpose(2, 0, 1))


def check_control(has_controlnet: bool, control: ControlRequest | None) -> None:
    """A ControlNet bundle needs a control image; a bundle without one takes none."""
    if has_controlnet and control is None:
        raise UserError("this bundle was built with a ControlNet: give --control-image FILE")
    if control is not None and not has_controlnet:
        raise UserError("--control-image needs a bundle built with --controlnet; this bundle has no ControlNet")
