"""ONNX graphs of the SD parts: the U-Net step graph (UNetStepModule) and the CLIP text encoder.

U-Net step graph I/O: the latent-shaped tensors have symbolic B, H, W (any size divisible by the
U-Net's down factor), context is (2B, L, D); t is fp32 (Euler's timesteps are fractional).
fp16 graphs follow export/onnx_export.py's typing rules: fp32 I/O and sampler update, fp16
convolutions and matmuls, LayerNorm / GroupNorm statistics and the attention softmax in fp32.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path

import torch

from tstitch_trt.errors import UserError
from tstitch_trt.export.onnx_export import OPSET, check_step_graph_typing, finish_export
from tstitch_trt.export.unet_step import UNET_STEP_OUTPUTS, UNetStepModule
from tstitch_trt.sampling.sd_samplers import HISTORY, SD_NUM_COEFS

TEXT_INPUT, TEXT_OUTPUT = "input_ids", "text_embeddings"


def unet_io_spec(step: UNetStepModule, text_len: int, pixel_factor: int = 8) -> dict:
    """Names, symbolic shapes and dtypes of the U-Net step graph plus its roles, for the manifest's io.

    pixel_factor: the VAE's downsampling (a ControlNet's image is (B, 3, 8H, 8W) at factor 8)."""
    cond = step.conditions
    c, n = step.channels, cond.cond_batch
    lat = ["B", c, "H", "W"]
    hist = ["B", HISTORY, c, "H", "W"]
    inputs: dict[str, list] = {"x": lat, "t": ["B"], "context": [n, text_len, step.cross_attention_dim]}
    if cond.added:
        inputs.update({"text_embeds": [n, step.text_embeds_dim], "time_ids": [n, 6]})
    ph, pw = f"{pixel_factor}H", f"{pixel_factor}W"
    if cond.control:
        inputs.update({"control_image": ["B", step.control_channels, ph, pw], "control_guess": []})
    inputs.update({"guidance": [], "coef": [SD_NUM_COEFS], "prev_x0": lat, "eps_hist": hist, "saved": lat,
                   "noise": lat})
    if cond.control:
        inputs["control_scale"] = []
    assert tuple(inputs) == cond.inputs, (tuple(inputs), cond.inputs)
    outputs = {"x_next": lat, "x0": lat, "eps_hist_next": hist, "saved_next": lat}
    ranges = latent_dim_ranges(step.sample_size, ("H", "W"))
    if cond.control:
        ranges.update({ph: [pixel_factor * v for v in ranges["H"]], pw: [pixel_factor * v for v in ranges["W"]]})
    f32 = "float32"
    return {
        "inputs": {k: {"shape": s, "dtype": f32} for k, s in inputs.items()},
        "outputs": {k: {"shape": s, "dtype": f32} for k, s in outputs.items()},
        "roles": cond.roles,
        "dim_ranges": ranges,
    }


def latent_dim_ranges(sample_size: int, names: tuple[str, str]) -> dict[str, list[int]]:
    """Engine profile range of the latent's H and W: half to twice the U-Net's sample size, opt at it
    (SD 1.5: 256 to 1024 px around 512)."""
    return {n: [max(1, sample_size // 2), sample_size, 2 * sample_size] for n in names}


def trace_size(step: UNetStepModule) -> int:
    """The latent size the fp16 step graph is traced at: the smallest the U-Net's levels take twice (a 2x2 map at
    its deepest level: SD 1.5 16, SDXL and BK-SDM-Tiny 8), never above its sample size."""
    levels = len(step.unet.config.block_out_channels)
    return min(step.sample_size, 2 * 2 ** (levels - 1))


def example_unet_inputs(step: UNetStepModule, text_len: int, batch: int = 1, pixel_factor: int = 8,
                        size: int | None = None) -> tuple[torch.Tensor, ...]:
    """One example value per graph input, in StepConditions.inputs order; size: the latent's H and W (default
    the U-Net's sample size)."""
    spec = unet_io_spec(step, text_len, pixel_factor)["inputs"]
    s = size or step.sample_size
    dims = {"B": batch, "2B": 2 * batch, "H": s, "W": s, f"{pixel_factor}H": pixel_factor * s,
            f"{pixel_factor}W": pixel_factor * s}
    values = {}
    for name, t in spec.items():
        shape = [dims[d] if isinstance(d, str) else d for d in t["shape"]]
        values[name] = torch.randn(shape)
    values["t"] = torch.full((batch,), 500.0)
    values["guidance"] = torch.tensor(7.5)
    values["coef"] = torch.rand(SD_NUM_COEFS)
    if "control_image" in values:
        values["control_image"] = values["control_image"].uniform_(0, 1)
        values["control_guess"], values["control_scale"] = torch.tensor(0.0), torch.tensor(1.0)
    if "time_ids" in values:
        values["time_ids"] = torch.tensor([float(8 * s), 8 * s, 0, 0, 8 * s, 8 * s]).repeat(dims["2B"] if
                                                                                           step.conditions.guidance
                                                                                           == "cfg" else batch, 1)
    return tuple(values[n] for n in step.conditions.inputs)


def cache_feature_spec(step: UNetStepModule, branch: int, text_len: int, pixel_factor: int = 8,
                       name: str = "the U-Net") -> dict:
    """The kept feature of DeepCache branch `branch` (export/deep_cache.py) as a manifest tensor spec: the U-Net's
    batch, its channels, and H, W over the level's down factor ("H/2"), found by one probe call."""
    from tstitch_trt.export.deep_cache import CacheStep

    full = CacheStep(step, branch, "full", name)
    with torch.no_grad():
        kept = full(*example_unet_inputs(step, text_len, pixel_factor=pixel_factor))[-1]
    s = step.sample_size
    f = s // int(kept.shape[-1])
    if f * int(kept.shape[-1]) != s or int(kept.shape[-2]) * f != s:
        raise UserError(f"{name}: DeepCache branch {branch} keeps a {tuple(kept.shape)} feature that is not the "
                        f"latent's size over a whole factor")
    hw = ["H", "W"] if f == 1 else [f"H/{f}", f"W/{f}"]
    return {"shape": [step.conditions.cond_batch, int(kept.shape[1]), *hw], "dtype": "float32"}


def cache_graph_io(io: dict, feature: dict, mode: str) -> dict:
    """The io of a model's full (mode "full": + the deep_next output) or cached ("cached": + the deep input)
    step graph, with the feature's scaled dims ("H/2") in dim_ranges (TensorRT profiles)."""
    from tstitch_trt.export.deep_cache import CACHE_INPUT, CACHE_OUTPUT

    part, name = ("outputs", CACHE_OUTPUT) if mode == "full" else ("inputs", CACHE_INPUT)
    out = {**io, part: {**io[part], name: feature}}
    ranges = dict(io.get("dim_ranges", {}))
    for d in feature["shape"]:
        if isinstance(d, str) and "/" in d:
            base, f = d.split("/")
            if base in ranges:
                ranges[d] = [max(1, v // int(f)) for v in ranges[base]]
    out["dim_ranges"] = ranges
    return out


def export_unet_step(step: UNetStepModule, path: str | Path, precision: str, text_len: int,
                     pixel_factor: int = 8, cache: tuple[int, str, dict] | None = None, consume: bool = False
                     ) -> Path:
    """Write the U-Net step graph (fp32, or fp16-typed for engines) and check its typing.

    cache: (DeepCache branch, "full" | "cached", the kept feature's spec): the model's full graph (+ output
    deep_next) or cached graph (+ input deep) of export/deep_cache.py.
    consume: fp16 converts `step` itself instead of a copy (the caller's last use of it): an SDXL U-Net
    is 10.3 GB in fp32, and a copy would hold both."""

    from tstitch_trt.export.deep_cache import CACHE_OUTPUT, CacheStep

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = unet_io_spec(step, text_len, pixel_factor)
    names, outputs = step.conditions.inputs, UNET_STEP_OUTPUTS
    # H and W are symbolic in every step graph, so the trace's size is only the cost of one forward pass: fp16
    # convolutions on a CPU without fp16 kernels run ~1000x slower than fp32, and tracing the SD 1.5 pair's fp16
    # graphs at 64x64 latents did not finish a BK-SDM-Tiny pass in 17 minutes (benchmarks/RESULTS.md, issue 20)
    s = trace_size(step) if precision != "fp32" else step.sample_size
    example = example_unet_inputs(step, text_len, pixel_factor=pixel_factor, size=s)
    module: torch.nn.Module = step if precision == "fp32" else _fp16_ready(step, consume)
    if cache is not None:
        branch, mode, feature = cache
        module = CacheStep(module, branch, mode)
        spec = cache_graph_io(spec, feature, mode)
        if mode == "full":
            outputs = (*outputs, CACHE_OUTPUT)
        else:
            names = module.inputs
            dims = {"B": 1, "2B": 2, "H": s, "W": s}
            shape = [dims[d] if d in dims else s // int(d.split("/")[1]) if isinstance(d, str) else d
                     for d in feature["shape"]]
            example = (*example, torch.randn(shape))
    dynamic_axes = {name: {i: d for i, d in enumerate(t["shape"]) if isinstance(d, str)}
                    for part in ("inputs", "outputs") for name, t in spec[part].items()}
    dynamic_axes = {k: v for k, v in dynamic_axes.items() if v}
    with tempfile.TemporaryDirectory(prefix="tstitch-export-", dir=path.parent) as raw_dir:
        raw = Path(raw_dir) / "raw.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module.eval(), example,
                              str(raw), input_names=list(names), output_names=list(outputs),
                              dynamic_axes=dynamic_axes, opset_version=OPSET, do_constant_folding=True, dynamo=False)
        finish_export(raw, path, prepare=lambda m: _restore_unused_inputs(m, spec, names),
                      check=lambda m: check_step_graph_typing(m, precision, float_io=tuple(names) + tuple(outputs),
                                                              int_io=()))
    return path


def _restore_unused_inputs(model, spec: dict, names: tuple[str, ...]) -> None:
    """The exporter drops an input no node reads (guidance of a U-Net without LCM's guidance embedding
    under "embedding" guidance); every step graph of a bundle declares the same inputs, so put it back."""
    from onnx import TensorProto, helper

    have = {i.name: i for i in model.graph.input}
    ordered = []
    for n in names:
        if n in have:
            ordered.append(have[n])
            continue
        shape = spec["inputs"][n]["shape"]
        ordered.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, shape))
    ordered += [i for i in model.graph.input if i.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(ordered)


def _fp16_ready(step: UNetStepModule, consume: bool = False) -> UNetStepModule:
    """An fp16 copy (consume: `step` itself, converted) with fp32 norms and an upcast attention softmax (the
    typing rules above)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    from tstitch_trt.export.vae_export import _GroupNormFp32

    module = (step if consume else copy.deepcopy(step)).to(torch.float16)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.GroupNorm):
                setattr(parent, name, _GroupNormFp32(child))
            elif isinstance(child, torch.nn.LayerNorm):
                setattr(parent, name, _LayerNormFp32(child))
            elif isinstance(child, Attention):
                child.upcast_softmax = True
    module.unet.set_attn_processor(AttnProcessor())  # SDPA would export an fp16 softmax
    if module.controlnet is not None:
        module.controlnet.set_attn_processor(AttnProcessor())
    return module.eval()


class _LayerNormFp32(torch.nn.Module):
    def __init__(self, norm: torch.nn.LayerNorm):
        super().__init__()
        self.shape, self.eps = norm.normalized_shape, norm.eps
        self.weight = None if norm.weight is None else torch.nn.Parameter(norm.weight.detach().float(), False)
        self.bias = None if norm.bias is None else torch.nn.Parameter(norm.bias.detach().float(), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x.float(), self.shape, self.weight, self.bias, self.eps).to(x.dtype)


TEXT_POOLED = "text_embeds"  # SDXL text_encoder_2's pooled, projected output (the step graphs' text_embeds)
HIDDEN_STATES = ("last", "penultimate", "penultimate-raw")


class TextEncoder(torch.nn.Module):
    """input_ids (N, L) int64 -> the CLIP hidden state the pipeline uses (N, L, D) fp32 [, pooled (N, P) fp32].

    layer: "last" (SD 1.x); "penultimate" through the final layer norm (diffusers' SD clip_skip 1);
    "penultimate-raw": hidden_states[-2] as is (diffusers' SDXL encode_prompt applies no final layer norm).
    pooled: also return the projected pooled embedding (CLIPTextModelWithProjection's text_embeds)."""

    def __init__(self, clip: torch.nn.Module, layer: str = "last", pooled: bool = False):
        super().__init__()
        if layer not in HIDDEN_STATES:
            raise ValueError(f"hidden state {layer!r} is not one of {HIDDEN_STATES}")
        self.clip, self.layer, self.pooled = clip, layer, pooled

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = self.clip(input_ids, output_hidden_states=self.layer != "last", return_dict=True)
        if self.layer == "last":
            hidden = out.last_hidden_state
        elif self.layer == "penultimate":
            hidden = self.clip.text_model.final_layer_norm(out.hidden_states[-2])
        else:
            hidden = out.hidden_states[-2]
        if self.pooled:
            return hidden.float(), out.text_embeds.float()
        return hidden.float()


def export_text_encoder(clip: torch.nn.Module, path: str | Path, precision: str, text_len: int,
                        layer: str = "last", pooled: bool = False, consume: bool = False) -> Path:
    """consume: fp16 converts `clip` itself (the caller's last use of it), no copy."""

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if precision == "fp16":
        clip = (clip if consume else copy.deepcopy(clip)).to(torch.float16)
    enc = TextEncoder(clip, layer, pooled).eval()
    if precision == "fp16":
        for parent in list(enc.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.LayerNorm):
                    setattr(parent, name, _LayerNormFp32(child))
    ids = torch.zeros((1, text_len), dtype=torch.int64)
    outputs = [TEXT_OUTPUT, TEXT_POOLED] if pooled else [TEXT_OUTPUT]
    with tempfile.TemporaryDirectory(prefix="tstitch-export-", dir=path.parent) as raw_dir:
        raw = Path(raw_dir) / "raw.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(enc, (ids,), str(raw), input_names=[TEXT_INPUT], output_names=outputs,
                              dynamic_axes={n: {0: "N"} for n in [TEXT_INPUT, *outputs]}, opset_version=OPSET,
                              do_constant_folding=True, dynamo=False)
        finish_export(raw, path)
    return path


def text_io_spec(text_len: int, width: int, batch_range: tuple[int, int] = (1, 4), pooled_dim: int = 0) -> dict:
    """N = prompts per request, both CFG halves: 2 x the step engines' batch range; pooled_dim > 0: the
    pooled text_embeds output too (SDXL's text_encoder_2)."""
    lo, hi = batch_range
    outputs = {TEXT_OUTPUT: {"shape": ["N", text_len, width], "dtype": "float32"}}
    if pooled_dim:
        outputs[TEXT_POOLED] = {"shape": ["N", pooled_dim], "dtype": "float32"}
    return {"inputs": {TEXT_INPUT: {"shape": ["N", text_len], "dtype": "int64"}},
            "outputs": outputs,
            "dim_ranges": {"N": [2 * lo, 2 * min(max(lo, 1), hi), 2 * hi]}}
