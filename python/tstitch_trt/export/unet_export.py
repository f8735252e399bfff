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

from tstitch_trt.export.onnx_export import OPSET, check_step_graph_typing, clean_graph, save_graph
from tstitch_trt.export.unet_step import UNET_STEP_INPUTS, UNET_STEP_OUTPUTS, UNET_STEP_ROLES, UNetStepModule
from tstitch_trt.sampling.sd_samplers import HISTORY, SD_NUM_COEFS

TEXT_INPUT, TEXT_OUTPUT = "input_ids", "text_embeddings"


def unet_io_spec(step: UNetStepModule, text_len: int) -> dict:
    """Names, symbolic shapes and dtypes of the U-Net step graph plus its roles, for the manifest's io."""
    c = step.channels
    lat = ["B", c, "H", "W"]
    f32 = "float32"
    inputs = {
        "x": lat, "t": ["B"], "context": ["2B", text_len, step.cross_attention_dim], "guidance": [],
        "coef": [SD_NUM_COEFS], "prev_x0": lat, "eps_hist": ["B", HISTORY, c, "H", "W"], "saved": lat, "noise": lat,
    }
    outputs = {"x_next": lat, "x0": lat, "eps_hist_next": ["B", HISTORY, c, "H", "W"], "saved_next": lat}
    return {
        "inputs": {n: {"shape": s, "dtype": f32} for n, s in inputs.items()},
        "outputs": {n: {"shape": s, "dtype": f32} for n, s in outputs.items()},
        "roles": UNET_STEP_ROLES,
        "dim_ranges": latent_dim_ranges(step.sample_size, ("H", "W")),
    }


def latent_dim_ranges(sample_size: int, names: tuple[str, str]) -> dict[str, list[int]]:
    """Engine profile range of the latent's H and W: half to twice the U-Net's sample size, opt at it
    (SD 1.5: 256 to 1024 px around 512)."""
    return {n: [max(1, sample_size // 2), sample_size, 2 * sample_size] for n in names}


def example_unet_inputs(step: UNetStepModule, text_len: int, batch: int = 1) -> tuple[torch.Tensor, ...]:
    c, s = step.channels, step.sample_size
    lat = (batch, c, s, s)
    coef = torch.rand(SD_NUM_COEFS)
    return (torch.randn(lat), torch.full((batch,), 500.0), torch.randn(2 * batch, text_len, step.cross_attention_dim),
            torch.tensor(7.5), coef, torch.randn(lat), torch.randn(batch, HISTORY, *lat[1:]), torch.randn(lat),
            torch.randn(lat))


def export_unet_step(step: UNetStepModule, path: str | Path, precision: str, text_len: int) -> Path:
    """Write the U-Net step graph (fp32, or fp16-typed for engines) and check its typing."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = step if precision == "fp32" else _fp16_ready(step)
    lat_axes = {0: "B", 2: "H", 3: "W"}
    dynamic_axes = {n: lat_axes for n in ("x", "prev_x0", "saved", "noise", "x_next", "x0", "saved_next")}
    dynamic_axes.update({"eps_hist": {0: "B", 3: "H", 4: "W"}, "eps_hist_next": {0: "B", 3: "H", 4: "W"},
                         "t": {0: "B"}, "context": {0: "2B"}})
    with tempfile.TemporaryDirectory(prefix="tstitch-export-", dir=path.parent) as raw_dir:
        raw = Path(raw_dir) / "raw.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module.eval(), example_unet_inputs(step, text_len), str(raw),
                              input_names=list(UNET_STEP_INPUTS), output_names=list(UNET_STEP_OUTPUTS),
                              dynamic_axes=dynamic_axes, opset_version=OPSET, do_constant_folding=True, dynamo=False)
        model = onnx.load(str(raw))
    model = clean_graph(model)
    check_step_graph_typing(model, precision, float_io=UNET_STEP_INPUTS + UNET_STEP_OUTPUTS, int_io=())
    save_graph(model, path)
    return path


def _fp16_ready(step: UNetStepModule) -> UNetStepModule:
    """An fp16 copy with fp32 norms and an upcast attention softmax (the typing rules above)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    from tstitch_trt.export.vae_export import _GroupNormFp32

    module = copy.deepcopy(step).to(torch.float16)
    for parent in list(module.unet.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.GroupNorm):
                setattr(parent, name, _GroupNormFp32(child))
            elif isinstance(child, torch.nn.LayerNorm):
                setattr(parent, name, _LayerNormFp32(child))
            elif isinstance(child, Attention):
                child.upcast_softmax = True
    module.unet.set_attn_processor(AttnProcessor())  # SDPA would export an fp16 softmax
    return module.eval()


class _LayerNormFp32(torch.nn.Module):
    def __init__(self, norm: torch.nn.LayerNorm):
        super().__init__()
        self.shape, self.eps = norm.normalized_shape, norm.eps
        self.weight = None if norm.weight is None else torch.nn.Parameter(norm.weight.detach().float(), False)
        self.bias = None if norm.bias is None else torch.nn.Parameter(norm.bias.detach().float(), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x.float(), self.shape, self.weight, self.bias, self.eps).to(x.dtype)


class TextEncoder(torch.nn.Module):
    """input_ids (N, L) int64 -> the CLIP hidden state the pipeline uses (N, L, D) fp32."""

    def __init__(self, clip: torch.nn.Module, layer: str = "last"):
        super().__init__()
        self.clip, self.layer = clip, layer

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.layer == "last":
            return self.clip(input_ids, return_dict=False)[0].float()
        # penultimate (clip_skip 1), through the final layer norm as diffusers does
        hidden = self.clip(input_ids, output_hidden_states=True, return_dict=False)[2][-2]
        return self.clip.text_model.final_layer_norm(hidden).float()


def export_text_encoder(clip: torch.nn.Module, path: str | Path, precision: str, text_len: int,
                        layer: str = "last") -> Path:
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    enc = TextEncoder(copy.deepcopy(clip).to(torch.float16) if precision == "fp16" else clip, layer).eval()
    if precision == "fp16":
        for parent in list(enc.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.LayerNorm):
                    setattr(parent, name, _LayerNormFp32(child))
    ids = torch.zeros((1, text_len), dtype=torch.int64)
    with tempfile.TemporaryDirectory(prefix="tstitch-export-", dir=path.parent) as raw_dir:
        raw = Path(raw_dir) / "raw.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(enc, (ids,), str(raw), input_names=[TEXT_INPUT], output_names=[TEXT_OUTPUT],
                              dynamic_axes={TEXT_INPUT: {0: "N"}, TEXT_OUTPUT: {0: "N"}}, opset_version=OPSET,
                              do_constant_folding=True, dynamo=False)
        model = onnx.load(str(raw))
    save_graph(clean_graph(model), path)
    return path


def text_io_spec(text_len: int, width: int, batch_range: tuple[int, int] = (1, 4)) -> dict:
    """N = prompts per request, both CFG halves: 2 x the step engines' batch range."""
    lo, hi = batch_range
    return {"inputs": {TEXT_INPUT: {"shape": ["N", text_len], "dtype": "int64"}},
            "outputs": {TEXT_OUTPUT: {"shape": ["N", text_len, width], "dtype": "float32"}},
            "dim_ranges": {"N": [2 * lo, 2 * min(max(lo, 1), hi), 2 * hi]}}
