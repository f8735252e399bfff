"""FORA (Fast-Forward Caching, Selvaraju et al. 2024, arXiv 2407.01425) inside a DiT step graph: the full and
the cached graph.

FORA's static caching: on a full call every DiT block runs whole and keeps its attention output and its MLP
output (both BEFORE the adaLN-Zero gate); on a cached call each block reuses them:

    x = x + gate_msa(c) * attn_kept[i];  x = x + gate_mlp(c) * mlp_kept[i]

with the gates of THIS call's conditioning c = t_embed(t) + y_embed(y). So a cached call runs only the cheap
parts: the patch / timestep / label embedders, every block's adaLN modulation (per sample, not per token), the
residual adds, the final layer and the sampler update; attention and the MLPs (nearly all of a DiT's MACs) are
skipped, and the ONNX export prunes their weights from the cached graph.

The kept features of all blocks cross the graph boundary as ONE tensor per model, so a step graph has one
cache input or output, the "cache" role of runtime/io_roles.py: (2B, depth, 2, T, D) fp32 (2B: the CFG-doubled
batch, conditional half first; [:, i, 0] block i's attention output, [:, i, 1] its MLP output; T tokens of
width D). It is the network's dtype inside (fp16 for engines; fp16 -> fp32 -> fp16 is exact).

Blocks are patched for the duration of one call (an instance attribute over DiTBlock.forward, as FORA's own
code swaps the block's forward path), never the class.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from tstitch_trt.export.step_module import STEP_INPUTS, StepModule
from tstitch_trt.models.dit import DiTBlock, DiTConfig, layer_norm_fp32, modulate

FORA_INPUT, FORA_OUTPUT = "fora", "fora_next"  # the kept features: cached graphs read them, full graphs write them
FORA_MODES = ("full", "cached")


def feature_spec(config: DiTConfig) -> dict[str, Any]:
    """The manifest tensor spec of one model's kept features (models[i].cached.feature)."""
    return {"shape": ["2B", config.depth, 2, config.num_tokens, config.hidden_size], "dtype": "float32"}


def feature_bytes(config: DiTConfig, batch: int) -> int:
    """Bytes of one model's kept-feature buffer at this batch (fp32)."""
    return 2 * batch * config.depth * 2 * config.num_tokens * config.hidden_size * 4


@contextlib.contextmanager
def _patched_blocks(blocks: nn.ModuleList, make: Callable[[int, DiTBlock], Callable[..., torch.Tensor]]
                    ) -> Iterator[None]:
    """forward of block i replaced by make(i, block) for the duration of one call, then removed."""
    try:
        for i, block in enumerate(blocks):
            block.forward = make(i, block)
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)


def _keeping(box: list[torch.Tensor]) -> Callable[[int, DiTBlock], Callable[..., torch.Tensor]]:
    """A full call: DiTBlock.forward's own arithmetic, the two branch outputs appended to `box`."""

    def make(i: int, block: DiTBlock) -> Callable[..., torch.Tensor]:
        d = block.hidden_size

        def forward(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)
            attn = block.attn(modulate(layer_norm_fp32(x, d), shift_msa, scale_msa))
            x = x + gate_msa.unsqueeze(1) * attn
            mlp = block.mlp(modulate(layer_norm_fp32(x, d), shift_mlp, scale_mlp))
            box.append(torch.stack([attn, mlp], dim=1))  # (2B, 2, T, D)
            return x + gate_mlp.unsqueeze(1) * mlp
        return forward
    return make


def _reusing(kept: torch.Tensor) -> Callable[[int, DiTBlock], Callable[..., torch.Tensor]]:
    """A cached call: this call's gates on block i's kept attention and MLP outputs."""

    def make(i: int, block: DiTBlock) -> Callable[..., torch.Tensor]:
        def forward(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            _, _, gate_msa, _, _, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)
            x = x + gate_msa.unsqueeze(1) * kept[:, i, 0]
            return x + gate_mlp.unsqueeze(1) * kept[:, i, 1]
        return forward
    return make


class ForaStep(nn.Module):
    """A DiT StepModule as FORA's full or cached step graph.

    full:   the step's inputs -> (x_next, x0, fora_next): the kept features, fp32
    cached: the step's inputs + fora -> (x_next, x0)
    """

    def __init__(self, step: StepModule, mode: str):
        super().__init__()
        if mode not in FORA_MODES:
            raise ValueError(f"FORA step mode {mode!r}")
        self.step, self.mode = step, mode

    @property
    def inputs(self) -> tuple[str, ...]:
        return (*STEP_INPUTS, FORA_INPUT) if self.mode == "cached" else STEP_INPUTS

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        named = dict(zip(self.inputs, args, strict=False))
        named.update(kwargs)
        blocks = self.step.denoiser.blocks
        if self.mode == "full":
            box: list[torch.Tensor] = []
            with _patched_blocks(blocks, _keeping(box)):
                outs = self.step(**named)
            return (*outs, torch.stack(box, dim=1).float())
        kept = named.pop(FORA_INPUT).to(self.step.dtype)
        with _patched_blocks(blocks, _reusing(kept)):
            return tuple(self.step(**named))


def fora_graph_io(io: dict[str, Any], feature: dict[str, Any], mode: str) -> dict[str, Any]:
    """The io of a model's full (+ the fora_next output) or cached (+ the fora input) step graph (engine
    profiles: "2B" ranges over twice the batch range)."""
    part, name = ("outputs", FORA_OUTPUT) if mode == "full" else ("inputs", FORA_INPUT)
    return {**io, part: {**io[part], name: feature}}
