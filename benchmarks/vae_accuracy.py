"""Each backend's fp32 VAE decode against torch in float64 (the same random-weight decoder): which one is off, and by
how much, as the decode grows. ORT as `check` runs it and with every graph optimization off; OpenVINO fp32.

    python benchmarks/vae_accuracy.py BUNDLE/vae out.json [--latents 64,128]

BUNDLE/vae: a bundle's vae folder (decoder-fp32.onnx and the diffusers AutoencoderKL under diffusers/). The float64
decode of the SDXL VAE needs ~2 GB at 512 px and over 23 GB at 1024 px (its mid-block attention).
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main() -> None:
    import onnxruntime as ort
    import openvino as ov
    import torch
    from diffusers import AutoencoderKL

    from tstitch_trt.runtime.ort_backend import aux_session

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("vae_dir")
    p.add_argument("out")
    p.add_argument("--latents", default="64", help="latent sizes (64 = 512 px)")
    args = p.parse_args()
    onnx = f"{args.vae_dir}/decoder-fp32.onnx"
    vae = AutoencoderKL.from_pretrained(f"{args.vae_dir}/diffusers").eval()
    rows = []
    for lat in (int(v) for v in args.latents.split(",")):
        z = np.random.default_rng(1).standard_normal((1, 4, lat, lat), dtype=np.float32)
        with torch.inference_mode():
            ref64 = vae.double().decode(torch.from_numpy(z).double()).sample.numpy()
            t32 = vae.float().decode(torch.from_numpy(z)).sample.numpy()
        plain = ort.SessionOptions()
        plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        outs = {"torch fp32": t32,
                "ort (check's session)": aux_session(onnx, True).run(["image"], {"latent": z})[0],
                "ort, optimizations off": ort.InferenceSession(onnx, plain, providers=["CPUExecutionProvider"]).run(
                    ["image"], {"latent": z})[0],
                "openvino fp32": ov.Core().compile_model(onnx, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(
                    {"latent": z})[0]}
        for name, out in outs.items():
            row = {"px": lat * 8, "decode": name, "rel_vs_fp64": float(np.abs(out - ref64).max() / np.abs(ref64).max()),
                   "rel_vs_torch_fp32": float(np.abs(out - t32).max() / np.abs(t32).max())}
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
