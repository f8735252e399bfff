"""The engine bundle: a directory with manifest.json and the files it names.

Language-neutral on purpose (the C++ runtime reads the same JSON). Layout:

    manifest.json
    models/<i>-<name>.safetensors       torch backend weights (official DiT keys)
    onnx/<i>-<name>-<precision>.onnx    step graphs (ort backend, and the source of engines)
    trt/<i>-<name>.plan                 TensorRT / TensorRT-RTX engines
    vae/...                             the VAE decoder (diffusers dir for torch, ONNX for ort)

Bundles are written to a temporary sibling directory and renamed into place, so a failed or
killed build never leaves a half bundle and never damages the previous one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tstitch_trt.errors import UserError

FORMAT = "tstitch-bundle"
FORMAT_VERSION = 1
BACKENDS = ("trt", "trt-rtx", "ort", "torch")


@dataclass
class EngineEntry:
    """One backend's artifact for one model (weights, ONNX graph or engine plan)."""

    file: str
    sha256: str
    precision: str = "fp32"
    batch_range: tuple[int, int] = (1, 16)
    builder: dict[str, Any] = field(default_factory=dict)  # e.g. tensorrt version, compute capability
    extra: dict[str, Any] = field(default_factory=dict)  # external_data: [{file, sha256}] (ONNX > 2 GB)

    @classmethod
    def from_dict(cls, d: dict) -> EngineEntry:
        d = dict(d)
        d["batch_range"] = tuple(d.get("batch_range", (1, 16)))
        return cls(**d)


@dataclass
class ModelEntry:
    name: str  # e.g. "DiT-S/2"
    family: str  # "dit"
    arch: dict[str, Any]  # DiTConfig as a dict
    engines: dict[str, EngineEntry] = field(default_factory=dict)  # backend -> artifact
    macs_per_forward: int = 0
    # Whether bf16 inference keeps quality (CPU backends; `tstitch-trt check --precision bf16 --record`):
    # {"safe": bool, "reason": str, "step_max_rel": float, "step_min_cosine": float, "checked_with": str}
    bf16: dict[str, Any] | None = None

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        a = self.arch
        return (int(a["in_channels"]), int(a["input_size"]), int(a["input_size"]))

    @classmethod
    def from_dict(cls, d: dict) -> ModelEntry:
        d = dict(d)
        d["engines"] = {k: EngineEntry.from_dict(v) for k, v in d.get("engines", {}).items()}
        return cls(**d)


@dataclass
class Manifest:
    pipeline: str  # "dit-class-conditional"
    models: list[ModelEntry]  # stitch order, smallest first
    num_classes: int
    image_size: int
    latent_scale_factor: float  # decode(latent / factor); 1.0 for pixel-space models
    guidance_channels: int  # eps channels that get CFG (3 = DiT reference)
    schedule: dict[str, Any] = field(default_factory=lambda: {"kind": "linear", "num_timesteps": 1000})
    vae: dict[str, Any] | None = None  # {"engines": {backend: EngineEntry}, ...}
    io: dict[str, Any] = field(default_factory=dict)
    created_by: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.models[0].latent_shape

    def backends(self) -> list[str]:
        """Backends every model has an artifact for, in preference order."""
        return [b for b in BACKENDS if all(b in m.engines for m in self.models)]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        d = dict(d)
        d["models"] = [ModelEntry.from_dict(m) for m in d["models"]]
        if d.get("vae"):
            vae = dict(d["vae"])
            vae["engines"] = {k: EngineEntry.from_dict(v) for k, v in vae.get("engines", {}).items()}
            d["vae"] = vae
        return cls(**d)

    def validate(self) -> None:
        if not self.models:
            raise UserError("the bundle names no models")
        shapes = {m.latent_shape for m in self.models}
        if len(shapes) > 1:
            listed = ", ".join(f"{m.name}: {m.latent_shape}" for m in self.models)
            raise UserError(f"the models' latent shapes differ ({listed}); stitched models must share one latent space")
        classes = {int(m.arch.get("num_classes", self.num_classes)) for m in self.models}
        if len(classes) > 1:
            raise UserError(f"the models' class counts differ ({sorted(classes)}); they must share one label space")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(bundle_dir: str | Path) -> Manifest:
    d = Path(bundle_dir)
    path = d / "manifest.json"
    if not d.is_dir():
        raise UserError(f"bundle {d} does not exist; build one with `tstitch-trt build` (or use --bundle demo)")
    if not path.is_file():
        raise UserError(f"{d} is not a bundle (no manifest.json); rebuild it with `tstitch-trt build`")
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT:
            raise ValueError(f"format is {raw.get('format')!r}, not {FORMAT!r}")
        if int(raw.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"format version {raw['format_version']} is newer than this runtime reads")
        manifest = Manifest.from_dict(raw)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is corrupt or not a tstitch bundle manifest ({e}); rebuild the bundle") from None
    manifest.validate()
    return manifest


def artifact_path(bundle_dir: str | Path, entry: EngineEntry, verify: bool = True) -> Path:
    """Path of an artifact, checked to exist and (verify=True) to match its recorded sha256."""
    p = Path(bundle_dir) / entry.file
    # ONNX graphs over 2 GB keep their weights beside them: extra["external_data"] = [{file, sha256}]
    for f, digest in [(entry.file, entry.sha256)] + [(d["file"], d["sha256"]) for d in
                                                      entry.extra.get("external_data", [])]:
        path = Path(bundle_dir) / f
        if not path.is_file():
            raise UserError(f"bundle file {path} is missing; rebuild the bundle")
        if verify and sha256_file(path) != digest:
            raise UserError(f"checksum mismatch for {path}: the file changed since the build; rebuild the bundle")
    return p


@contextmanager
def staged_bundle(out_dir: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `out_dir`; on success it replaces `out_dir` atomically.

    On any exception (or a kill, which leaves only a hidden .tmp directory) `out_dir` is untouched.
    """
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a bundle is shared like any build output
    try:
        yield tmp
        if not (tmp / "manifest.json").is_file():
            raise RuntimeError("internal error: staged bundle has no manifest.json")
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def add_file(bundle_dir: Path, rel: str, write: Callable[[Path], None], **entry: Any) -> EngineEntry:
    """Write an artifact with `write(path)` and return its manifest entry (with sha256)."""
    path = bundle_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path)
    return EngineEntry(file=rel, sha256=sha256_file(path), **entry)


def write_manifest(bundle_dir: Path, manifest: Manifest) -> None:
    manifest.validate()
    (bundle_dir / "manifest.json").write_text(manifest.to_json())
