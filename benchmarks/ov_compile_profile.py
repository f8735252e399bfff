"""Where one OpenVINO compile goes, stage by stage: read the graph, make it static, mark it for bf16 (ours), compile
in bf16; time and RSS (total and anonymous, /proc/self/status) after each. One model per process.

    python benchmarks/ov_compile_profile.py ours BUNDLE/onnx/1-sdxl-fp32.onnx out.jsonl BUNDLE
    python benchmarks/ov_compile_profile.py ours-nomark BUNDLE/onnx/1-sdxl-fp32.onnx out.jsonl BUNDLE
    python benchmarks/ov_compile_profile.py optimum OV_DIR/unet/openvino_model.xml out.jsonl

KIND: ours (our step graph, marked as runtime/openvino_backend.compile_static marks it), ours-nomark (the same graph
compiled without marking), optimum (optimum-intel's SDXL U-Net IR as GenAI compiles it: batch 2, 128x128 latent).
Ours' static shapes are the step graph's at batch 1 with CFG and a 128 x 128 latent (SDXL at 1024 px).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def _status_gb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> None:
    import openvino as ov

    kind, path, out = sys.argv[1], sys.argv[2], sys.argv[3]
    core = ov.Core()
    row: dict = {"kind": kind, "path": path}
    t = time.perf_counter()
    model = core.read_model(path)
    row["read_s"] = time.perf_counter() - t
    t = time.perf_counter()
    static = model.clone()
    if kind.startswith("ours"):
        from tstitch_trt.bundle.manifest import read_manifest
        from tstitch_trt.runtime.io_roles import step_io

        io = step_io(read_manifest(Path(sys.argv[4])))
        dims = io.dims((1, 4, 128, 128))
        static.reshape({i.get_any_name(): list(io.shape(i.get_any_name(), dims)) for i in model.inputs})
    else:
        static.reshape({"sample": [2, 4, 128, 128], "timestep": [1], "encoder_hidden_states": [2, 77, 2048],
                        "text_embeds": [2, 1280], "time_ids": [2, 6]})
    row["reshape_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if kind == "ours":
        from tstitch_trt.runtime.openvino_backend import marked_for_bf16

        static = marked_for_bf16(core, static)
    row["mark_bf16_s"] = time.perf_counter() - t
    row["rss_after_mark"], row["anon_after_mark"] = _status_gb("VmRSS"), _status_gb("RssAnon")
    t = time.perf_counter()
    compiled = core.compile_model(static, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "bf16"})
    row["compile_s"] = time.perf_counter() - t
    del model, static
    row["rss_compiled"], row["anon_compiled"] = _status_gb("VmRSS"), _status_gb("RssAnon")
    row["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    assert compiled is not None
    print(json.dumps(row))
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
