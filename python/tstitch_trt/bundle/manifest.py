"""The engine bundle: a directory with manifest.json and the files it names.

Language-neutral on purpose (the C++ runtime reads the same JSON). Layout:

    manifest.json
    models/<i>-<name>.safetensors       torch backend weights (official DiT keys)
    onnx/<i>-<name>-<precision>.onnx    step graphs (ort backend, and the source of engines)
    trt/<i>-<name>.plan                 TensorRT / TensorRT-RTX engines
    vae/...                             the VAE decoder (diffusers dir for torch, ONNX for ort)

The format is described once, by manifest.schema.json (bundle/schema.py validates every manifest
against it before anything reads a field); the consistency rules between fields are in
Manifest.validate. Paths are sealed inside the bundle and files are checked against their sha256
(bundle/files.py). Bundles are written to a temporary sibling directory and renamed into place
(bundle/staging.py), so a failed or killed build never leaves a half bundle and never damages the previous one.
"""

from __future__ import annotations

import json
import math
import posixpath
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tstitch_trt.bundle.files import checked_file, inside, sha256_file
from tstitch_trt.bundle.graphs import external_data_locations
from tstitch_trt.bundle.schema import FORMAT, FORMAT_VERSION, validate_schema
from tstitch_trt.errors import BundleError, UserError

__all__ = ["BACKENDS", "FORMAT", "FORMAT_VERSION", "EngineEntry", "Manifest", "ModelEntry", "add_file",
           "artifact_path", "onnx_entry", "read_manifest", "sha256_file", "verify_bundle", "write_manifest"]

BACKENDS = ("trt", "trt-rtx", "ort", "torch")
ARTIFACTS_OF = {"openvino": "ort"}  # backends that run another backend's artifacts (OpenVINO: the ONNX graphs)
MAX_MANIFEST_BYTES = 16 << 20


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

    def files(self) -> list[tuple[str, str]]:
        """(path, sha256) of every file this artifact reads: itself, external ONNX data, extra files."""
        return [(self.file, self.sha256)] + [(d["file"], d["sha256"]) for d in
                                             self.extra.get("external_data", []) + self.extra.get("files", [])]


@dataclass
class ModelEntry:
    name: str  # e.g. "DiT-S/2"
    family: str  # "dit"
    arch: dict[str, Any]  # DiTConfig as a dict
    engines: dict[str, EngineEntry] = field(default_factory=dict)  # backend -> artifact
    macs_per_forward: int = 0
    # Whether bf16 inference keeps quality (CPU backends; `tstitch-trt check --precision bf16 --record`):
    # {"safe": bool, "reason": str, "step_max_rel": float, "step_min_cosine": float, "checked_with": str,
    #  "isa": ["amx_bf16" | "avx512_bf16", ...] (the CPU bf16 ISAs it was measured on; absent in older bundles)}
    bf16: dict[str, Any] | None = None
    # LoRA weights fused before export: [{"source", "sha256", "scale"}] (informational)
    lora: list[dict[str, Any]] | None = None
    # DeepCache (manifest `cache`): {"feature": the kept feature's tensor spec (this model's shape), "engines":
    # {backend: the CACHED step graph}}; `engines` then holds the FULL graph (it also outputs the feature).
    # torch has no cached artifact: the same weights run either path.
    cached: dict[str, Any] | None = None

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W); U-Nets (family "unet") take any H, W: this is their default, sample_size."""
        a = self.arch
        size = int(a["input_size"] if "input_size" in a else a["sample_size"])
        return (int(a["in_channels"]), size, size)

    @classmethod
    def from_dict(cls, d: dict) -> ModelEntry:
        d = dict(d)
        d["engines"] = {k: EngineEntry.from_dict(v) for k, v in d.get("engines", {}).items()}
        if d.get("cached"):
            c = dict(d["cached"])
            c["engines"] = {k: EngineEntry.from_dict(v) for k, v in c.get("engines", {}).items()}
            d["cached"] = c
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
    # Text-to-image additions, all optional (None for DiT bundles):
    #   pipeline "sd": models are U-Nets (family "unet", arch = the diffusers UNet config, latent
    #     (C, sample_size, sample_size) by default, any H/W divisible by the VAE factor at run time);
    #     num_classes 0; io["roles"] = the step graph's I/O by role (runtime/io_roles.py: state pairs,
    #     per-step rows, per-request constants); io["inputs"/"outputs"] may use symbolic dims B, 2B, H, W.
    #   text_encoder: {"source", "kind": "CLIPTextModel", "hidden_state": "last" | "penultimate",
    #     "engines": {backend: EngineEntry}, "io": input_ids (N, L) int64 -> text_embeddings (N, L, D)}.
    #   tokenizer: {"file": EngineEntry (tokenizer.json for the `tokenizers` library), "max_length",
    #     "pad_id", "kind": "clip"}.
    #   scheduler: the large pipeline's diffusers scheduler_config.json, as is (samplers are built from it).
    #   pipeline "sdxl": + text_encoder_2 / tokenizer_2 (OpenCLIP bigG: penultimate hidden state
    #     concatenated after text_encoder's, pooled text_embeds) and conditioning's SDXL fields.
    #   conditioning: {"guidance": "cfg" | "embedding", "force_zeros_for_empty_prompt", "text_embeds_dim",
    #     "time_ids": 6, "controlnet": {"source", "family", "conditioning_channels", "engines"} | None};
    #     absent = cfg guidance, text context only.
    text_encoder: dict[str, Any] | None = None
    tokenizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    text_encoder_2: dict[str, Any] | None = None
    tokenizer_2: dict[str, Any] | None = None
    conditioning: dict[str, Any] | None = None
    # Feature caching: {"scheme": "deepcache", "branch": K} (U-Nets, export/deep_cache.py) or {"scheme": "fora"}
    # (DiTs, export/fora.py); each model then has `cached` and io.roles.cache names the kept feature's
    # (input, output) pair.
    cache: dict[str, Any] | None = None

    @property
    def text_to_image(self) -> bool:
        return self.pipeline in ("sd", "sdxl")

    @property
    def guidance_mode(self) -> str:
        """How guidance reaches the U-Nets: "cfg" (batch doubling) or "embedding" (LCM, no doubling)."""
        return str((self.conditioning or {}).get("guidance", "cfg"))

    @property
    def controlnet(self) -> dict[str, Any] | None:
        return (self.conditioning or {}).get("controlnet")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.models[0].latent_shape

    def backends(self) -> list[str]:
        """Backends every model has an artifact for, in preference order."""
        return [b for b in BACKENDS if all(b in m.engines for m in self.models)]

    def to_json(self) -> str:
        d = asdict(self)
        # feature caching is written only where a bundle has it: a bundle without stays byte-identical to before
        if d["cache"] is None:
            del d["cache"]
        for m in d["models"]:
            if m["cached"] is None:
                del m["cached"]
        return json.dumps(d, indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        d = dict(d)
        d["models"] = [ModelEntry.from_dict(m) for m in d["models"]]
        for part in ("vae", "text_encoder", "text_encoder_2"):
            if d.get(part):
                entry = dict(d[part])
                entry["engines"] = {k: EngineEntry.from_dict(v) for k, v in entry.get("engines", {}).items()}
                d[part] = entry
        net = (d.get("conditioning") or {}).get("controlnet")
        if net:
            net = dict(net)
            net["engines"] = {k: EngineEntry.from_dict(v) for k, v in net.get("engines", {}).items()}
            d["conditioning"] = {**d["conditioning"], "controlnet": net}
        return cls(**d)

    def artifacts(self) -> list[tuple[str, EngineEntry]]:
        """(what, entry) for every artifact: each model's, the VAE's, the text encoder's, the tokenizer."""
        out = [(f"{m.name} {kind}", e) for m in self.models for kind, e in m.engines.items()]
        out += [(f"{m.name} cached {kind}", e) for m in self.models if m.cached
                for kind, e in m.cached["engines"].items()]
        for part, label in ((self.vae, "VAE"), (self.text_encoder, "text encoder"),
                            (self.text_encoder_2, "text encoder 2"), (self.controlnet, "ControlNet")):
            if part:
                out += [(f"{label} {kind}", e) for kind, e in part["engines"].items()]
        for tok, label in ((self.tokenizer, "tokenizer"), (self.tokenizer_2, "tokenizer 2")):
            if tok:
                f = tok["file"]
                out.append((label, EngineEntry(file=f["file"], sha256=f["sha256"])))
        return out

    def files(self) -> list[str]:
        return [f for _, e in self.artifacts() for f, _ in e.files()]

    def in_owned_dir(self, rel: str) -> bool:
        """Files inside a directory an artifact reads as a whole (a diffusers model or tokenizer directory)."""
        dirs = [e.extra["dir"].rstrip("/") + "/" for _, e in self.artifacts() if e.extra.get("dir")]
        for tok in (self.tokenizer, self.tokenizer_2):
            if tok:
                dirs.append(str(Path(tok["file"]["file"]).parent) + "/")
        return any(rel.startswith(d) for d in dirs)

    def validate(self) -> None:
        """Consistency between fields (the schema checks each field on its own)."""
        if not self.models:
            raise BundleError("the bundle names no models")
        shapes = {m.latent_shape for m in self.models}
        if len(shapes) > 1:
            listed = ", ".join(f"{m.name}: {m.latent_shape}" for m in self.models)
            raise BundleError(f"the models' latent shapes differ ({listed}); stitched models must share one "
                              "latent space")
        for what, e in self.artifacts():
            lo, hi = e.batch_range
            if lo > hi:
                raise BundleError(f"{what}: batch_range [{lo}, {hi}] is empty (min > max)")
        if not math.isfinite(self.latent_scale_factor):
            raise BundleError("latent_scale_factor is not a finite number")
        if self.text_to_image:
            self._validate_sd()
        else:
            self._validate_dit()

    def _validate_dit(self) -> None:
        classes = {int(m.arch.get("num_classes", self.num_classes)) for m in self.models}
        if classes != {self.num_classes}:
            raise BundleError(f"the models' class counts ({sorted(classes)}) differ from num_classes "
                              f"{self.num_classes}; they must share one label space")
        c, h, w = self.latent_shape
        for m in self.models:
            a = m.arch
            if a["input_size"] % a["patch_size"]:
                raise BundleError(f"{m.name}: input_size {a['input_size']} is not a multiple of patch_size "
                                  f"{a['patch_size']}")
            if a["hidden_size"] % a["num_heads"]:
                raise BundleError(f"{m.name}: hidden_size {a['hidden_size']} is not a multiple of num_heads "
                                  f"{a['num_heads']}")
        if self.guidance_channels > c:
            raise BundleError(f"guidance_channels {self.guidance_channels} exceeds the latent's {c} channels")
        pixel_space = self.vae is None and self.latent_scale_factor == 1.0
        if (h != w or (pixel_space and self.image_size != h) or (not pixel_space and self.image_size % h)):
            raise BundleError(f"image_size {self.image_size} does not fit the models' latent {h}x{w}")
        if self.io:
            for name, want in (("x", [c, h, w]), ("x_next", [c, h, w])):
                spec = self.io.get("inputs", {}).get(name) or self.io.get("outputs", {}).get(name)
                if spec is not None and list(spec["shape"][1:]) != want:
                    raise BundleError(f"io: {name} has shape {spec['shape']}, but the models' latent is "
                                      f"{c}x{h}x{w}")
        if self.text_encoder or self.tokenizer or self.scheduler or self.text_encoder_2 or self.conditioning:
            raise BundleError("a class-conditional (DiT) bundle has a text encoder, tokenizer or scheduler entry; "
                              "rebuild the bundle")
        if self.cache is not None and self.cache.get("scheme") != "fora":
            raise BundleError(f"a class-conditional (DiT) bundle caches with FORA, not {self.cache.get('scheme')}; "
                              "rebuild the bundle")
        self._validate_cache(self.io.get("roles") or {})

    def _validate_sd(self) -> None:
        widths = {int(m.arch["cross_attention_dim"]) for m in self.models}
        text_width = {self._text_width()} if self._text_width() else set()
        if len(widths) > 1 or (text_width and text_width != widths):
            listed = ", ".join(f"{m.name}: {m.arch['cross_attention_dim']}" for m in self.models)
            raise BundleError(f"the U-Nets' cross-attention widths ({listed}) and the text encoder's "
                              f"({sorted(text_width)}) must all be equal; rebuild the bundle")
        roles = self.io.get("roles")
        if not roles:
            raise BundleError("io.roles is missing: a text-to-image bundle must record its step graph's roles")
        if self.pipeline == "sdxl":
            self._validate_sdxl()
        names = set(self.io.get("inputs", {})) | set(self.io.get("outputs", {}))
        named = {n for pair in roles["state"] for n in pair} | set(roles["step"]) | set(roles["request"])
        if self.cache is not None and self.cache.get("scheme") != "deepcache":
            raise BundleError(f"a text-to-image bundle caches with DeepCache, not {self.cache.get('scheme')}; rebuild "
                              "the bundle")
        self._validate_cache(roles)
        if named != names:
            raise BundleError(f"io.roles names {sorted(named ^ names)[:3]} that are not (or not all) the step "
                              "graph's inputs and outputs; rebuild the bundle")
        if (self.controlnet is not None) != ("control_image" in self.io.get("inputs", {})):
            raise BundleError("conditioning.controlnet and the step graphs' control_image input come together (a "
                              "ControlNet runs inside the step graphs); rebuild the bundle")

    def _validate_cache(self, roles: dict[str, Any]) -> None:
        """`cache`, io.roles.cache and every model's `cached` come together; each model has a cached graph for
        every backend it has a (full) graph for, torch aside."""
        have = [self.cache is not None, "cache" in roles] + [m.cached is not None for m in self.models]
        if any(have) and not all(have):
            raise BundleError("cache, io.roles.cache and every model's cached entry come together (DeepCache's "
                              "full and cached step graphs); rebuild the bundle")
        for m in self.models:
            missing = [k for k in m.engines if k != "torch" and k not in (m.cached or {}).get("engines", {})]
            if m.cached and missing:
                raise BundleError(f"{m.name}: no cached step graph for {', '.join(missing)}; rebuild the bundle")

    def _validate_sdxl(self) -> None:
        """The pooled width agrees between the conditioning, the step graphs and text_encoder_2."""
        want = (self.conditioning or {}).get("text_embeds_dim")
        graph = (self.io.get("inputs", {}).get("text_embeds") or {}).get("shape", [None, None])[-1]
        pooled = ((self.text_encoder_2 or {}).get("io", {}).get("outputs", {}).get("text_embeds") or {}).get(
            "shape", [None, None])[-1]
        if not want or graph != want or pooled != want:
            raise BundleError(f"the sdxl bundle's pooled text_embeds widths disagree (conditioning {want}, step graphs "
                              f"{graph}, text_encoder_2 {pooled}); rebuild the bundle")

    def _text_width(self) -> int:
        """The context width the text encoder(s) produce (SDXL: both encoders' hidden states, concatenated)."""
        total = 0
        for te in (self.text_encoder, self.text_encoder_2):
            spec = (te or {}).get("io", {}).get("outputs", {}).get("text_embeddings", {}).get("shape") or [0]
            total += spec[-1] if isinstance(spec[-1], int) else 0
        return total

    def batch_limits(self, backend: str) -> tuple[int, int]:
        """The batch range every model's artifact for `backend` was built for (VAE included)."""
        backend = ARTIFACTS_OF.get(backend, backend)
        ranges = [e.batch_range for m in self.models for k, e in m.engines.items() if k == backend]
        if self.vae and backend in self.vae["engines"]:
            ranges.append(self.vae["engines"][backend].batch_range)
        if not ranges:
            raise UserError(f"the bundle has no {backend} artifacts")
        return (max(r[0] for r in ranges), min(r[1] for r in ranges))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def read_manifest(bundle_dir: str | Path) -> Manifest:
    """The bundle's manifest, validated against the schema and for consistency (files not read yet)."""
    d = Path(bundle_dir)
    if not d.is_dir():
        raise UserError(f"bundle {d} does not exist (or is not a folder); build one with `tstitch-trt build` "
                        "(or use --bundle demo)")
    path = d / "manifest.json"
    if not path.exists() and not path.is_symlink():
        raise UserError(f"{d} is not a bundle (no manifest.json); build one with `tstitch-trt build`")
    real = checked_file(d, "manifest.json", None)  # inside the bundle, a regular file
    if real.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path} is {real.stat().st_size} bytes, far larger than a manifest; rebuild the bundle")
    try:
        raw = json.loads(real.read_bytes().decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise BundleError(f"{path} is not valid JSON ({str(e).splitlines()[0][:120]}); rebuild the bundle") from None
    except RecursionError:
        raise BundleError(f"{path} nests deeper than any manifest does; rebuild the bundle") from None
    except OSError as e:
        raise BundleError(f"cannot read {path} ({e.strerror}); check its permissions") from None
    validate_schema(raw, str(path))
    manifest = Manifest.from_dict(raw)
    manifest.validate()
    return manifest


def verify_bundle(bundle_dir: str | Path, manifest: Manifest, fresh: bool = False) -> None:
    """Every file the manifest names: inside the bundle, present, and matching its sha256 (fresh: hashed now,
    not taken from the memo of verified files); and every file an ONNX graph names (external data): inside
    the bundle and checksummed by the manifest (bundle/graphs.py)."""
    from tstitch_trt.bundle.graphs import check_graph_references

    for _, entry in manifest.artifacts():
        for rel, digest in entry.files():
            checked_file(bundle_dir, rel, digest, fresh=fresh)
        if entry.file.endswith(".onnx"):
            check_graph_references(bundle_dir, entry.file, [rel for rel, _ in entry.files()])
        if entry.extra.get("dir"):
            inside(bundle_dir, entry.extra["dir"])


def artifact_path(bundle_dir: str | Path, entry: EngineEntry, verify: bool = True) -> Path:
    """Path of an artifact, checked to be inside the bundle, to exist and (verify) to match its sha256."""
    paths = [checked_file(bundle_dir, rel, digest, verify) for rel, digest in entry.files()]
    if entry.file.endswith(".onnx"):  # every backend that opens a graph comes through here
        from tstitch_trt.bundle.graphs import check_graph_references

        check_graph_references(bundle_dir, entry.file, [rel for rel, _ in entry.files()])
    return paths[0]


def onnx_entry(bundle_dir: str | Path, rel: str, **entry: Any) -> EngineEntry:
    """The entry of an ONNX graph in the bundle: its checksum and, over 2 GB, its external weight files'."""
    graph = Path(bundle_dir) / rel
    data = [posixpath.normpath(posixpath.join(posixpath.dirname(rel), loc)) for loc in external_data_locations(graph)]
    extra = dict(entry.pop("extra", {}))
    if data:
        extra["external_data"] = [{"file": f, "sha256": sha256_file(Path(bundle_dir) / f)} for f in data]
    return EngineEntry(file=rel, sha256=sha256_file(graph), extra=extra, **entry)


def directory_entry(bundle_dir: Path, rel_dir: str, **entry: Any) -> EngineEntry:
    """The entry of a saved diffusers / transformers model directory: its weights are the artifact, every
    other file in it (config.json, ...) is checksummed too, and the directory is the artifact's own."""
    root = Path(bundle_dir)
    files = sorted(p for p in (root / rel_dir).rglob("*") if p.is_file())
    weights = [p for p in files if p.suffix == ".safetensors"]
    if len(weights) != 1:
        raise RuntimeError(f"internal error: {rel_dir} holds {len(weights)} .safetensors files, expected one")
    others = [{"file": p.relative_to(root).as_posix(), "sha256": sha256_file(p)} for p in files if p != weights[0]]
    return EngineEntry(file=weights[0].relative_to(root).as_posix(), sha256=sha256_file(weights[0]),
                       extra={"dir": rel_dir, "files": others}, **entry)


def add_file(bundle_dir: Path, rel: str, write: Callable[[Path], None], **entry: Any) -> EngineEntry:
    """Write an artifact with `write(path)` and return its manifest entry (with sha256)."""
    path = bundle_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path)
    return EngineEntry(file=rel, sha256=sha256_file(path), **entry)


def write_manifest(bundle_dir: Path, manifest: Manifest) -> None:
    """Write manifest.json, held to the same schema and rules the reader applies."""
    manifest.validate()
    raw = json.loads(manifest.to_json())
    validate_schema(raw, "the new manifest")
    (bundle_dir / "manifest.json").write_text(manifest.to_json())
