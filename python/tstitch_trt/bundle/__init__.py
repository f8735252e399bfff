"""The on-disk engine bundle (manifest.json + files). No torch, no TensorRT."""

from tstitch_trt.bundle.manifest import (
    BACKENDS,
    EngineEntry,
    Manifest,
    ModelEntry,
    artifact_path,
    read_manifest,
    sha256_file,
    verify_bundle,
    write_manifest,
)
from tstitch_trt.bundle.staging import staged_bundle

__all__ = [
    "BACKENDS",
    "EngineEntry",
    "Manifest",
    "ModelEntry",
    "artifact_path",
    "read_manifest",
    "sha256_file",
    "staged_bundle",
    "verify_bundle",
    "write_manifest",
]
