"""What `tstitch-trt check` can verify without PyTorch: the bundle's files and its ONNX graphs' I/O."""

from __future__ import annotations

from pathlib import Path

from tstitch_trt.bundle.manifest import artifact_path, read_manifest, verify_bundle


def check_integrity(bundle: Path) -> list[str]:
    """Lines describing what was verified; raises BundleError at the first problem."""
    manifest = read_manifest(bundle)
    verify_bundle(bundle, manifest)
    lines = [f"check {bundle}: manifest valid (schema, sealed paths); "
             f"{len(manifest.files())} files match their sha256"]
    import onnxruntime as ort

    from tstitch_trt.runtime.ort_backend import check_graph_io

    for m in manifest.models:
        entry = m.engines.get("ort")
        if entry is None:
            continue
        path = artifact_path(bundle, entry)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        check_graph_io(sess, manifest.io, f"the ONNX graph of {m.name}")
        lines.append(f"  {m.name} ort: {path.name} loads in ONNX Runtime {ort.__version__}, I/O as the manifest says")
    return lines
