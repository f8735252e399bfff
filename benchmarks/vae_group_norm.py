"""The SD VAE decoder's GroupNorms exported as torch does (one InstanceNormalization over each flattened group) and as
the VAE export does (export/vae_export._GroupNormTwoLevel: means of means), on the same random-weight decoder at its
published architecture: each graph's error against torch in float64 and its time on ONNX Runtime and on OpenVINO
(fp32, bf16 as the runtime marks it), alternating, min and median of the warm repeats.

    python benchmarks/vae_group_norm.py out.json [--latent 64] [--repeats 5] [--work DIR]

--latent 64 is 512 px; the float64 reference of a 1024 px decode (--latent 128) needs over 23 GB.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def export_both(work: Path, latent: int) -> tuple[dict[str, Path], object]:
    """{form: decoder graph} of one random SD VAE (real_configs.SD_VAE), and the VAE."""
    from diffusers import AutoencoderKL

    import tstitch_trt.export.vae_export as vae_export
    from tstitch_trt.models.real_configs import SD_VAE, _materialize

    vae = _materialize(lambda: AutoencoderKL(**SD_VAE), 1)
    graphs = {"two levels": vae_export.export_vae_decoder(vae, work / "two-levels.onnx", (4, latent, latent),
                                                         dynamic_hw=True)}
    two_level = vae_export._GroupNormTwoLevel
    vae_export._GroupNormTwoLevel = lambda norm: norm  # torch's own GroupNorm export, as before
    try:
        graphs["one sum"] = vae_export.export_vae_decoder(vae, work / "one-sum.onnx", (4, latent, latent),
                                                          dynamic_hw=True)
    finally:
        vae_export._GroupNormTwoLevel = two_level
    return graphs, vae


def main() -> None:
    import torch

    from tstitch_trt.runtime.openvino_graph import OpenVinoGraph
    from tstitch_trt.runtime.ort_backend import aux_session

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="warm calls per graph and backend (after one cold)")
    p.add_argument("--work", type=Path, default=None, help="where the two graphs go (default: a temporary folder)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="vae-gn-") as tmp:
        work = args.work or Path(tmp)
        graphs, vae = export_both(work, args.latent)
        z = np.random.default_rng(1).standard_normal((1, 4, args.latent, args.latent), dtype=np.float32)
        with torch.inference_mode():
            ref = vae.double().decode(torch.from_numpy(z).double()).sample.numpy()
        del vae
        calls = {}
        for form, path in graphs.items():
            sess = aux_session(path, False)
            calls[(form, "ort")] = lambda s=sess: s.run(["image"], {"latent": z})[0]
            for precision in ("fp32", "bf16"):
                graph = OpenVinoGraph(path, precision)
                calls[(form, f"openvino {precision}")] = lambda g=graph: g({"latent": z})["image"]
        times: dict[tuple[str, str], list[float]] = {k: [] for k in calls}
        errors = {}
        for r in range(args.repeats + 1):  # alternating: every graph and backend once per round
            for key, call in calls.items():
                start = time.perf_counter()
                out = call()
                if r:
                    times[key].append(time.perf_counter() - start)
                errors[key] = float(np.abs(out - ref).max() / np.abs(ref).max())
    rows = []
    for (form, backend), ts in times.items():
        ts.sort()
        rows.append({"groupnorm": form, "backend": backend, "px": 8 * args.latent, "min_s": round(ts[0], 3),
                     "median_s": round(ts[len(ts) // 2], 3), "rel_vs_float64": errors[(form, backend)]})
        print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
