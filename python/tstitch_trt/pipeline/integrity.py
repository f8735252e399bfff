"""What `tstitch-trt check` can verify without PyTorch: the bundle's files and its ONNX graphs' I/O."""

from __future__ import annotations

from pathlib import Path

from tstitch_trt.bundle.manifest import artifact_path, read_manifest, verify_bundle


def check_integrity(bundle: Path) -> list[str]:
    """Lines describing what was verified; raises BundleError at the first problem."""
    manifest = read_manifest(bundle)
    verify_bundle(bundle, manifest, fresh=True)
    lines = [f"check {bundle}: manifest valid (schema, sealed paths); "
             f"{len(manifest.files())} files match their sha256"]
    import onnxruntime as ort

    from tstitch_trt.runtime.io_roles import graph_io, step_io
    from tstitch_trt.runtime.ort_backend import check_graph_io

    io = step_io(manifest)
    for i, m in enumerate(manifest.models):
        # the step graph, and DeepCache's cached one where the bundle has it (each with the kept feature's I/O)
        for cached, entry in ((False, m.engines.get("ort")), (True, (m.cached or {}).get("engines", {}).get("ort"))):
            if entry is None:
                continue
            path = artifact_path(bundle, entry)
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            check_graph_io(sess, graph_io(manifest.io, io, i, cached), f"the ONNX graph of {m.name}")
            lines.append(f"  {m.name} ort{' (cached)' if cached else ''}: {path.name} loads in ONNX Runtime "
                         f"{ort.__version__}, I/O as the manifest says")
    return lines
