"""DeepCache (horseee/DeepCache, PyPI `deepcache`) inside a U-Net step graph: the full and the cached graph.

DeepCache's DeepCacheSDHelper names a skip branch K (cache_branch_id): block B = K // 3 and layer L = K % 3,
both counted from the U-Net's shallow end (up block 0 is the LAST up block, layer 0 its last resnet). On a
full call everything runs and the helper keeps every block's output; on a cached call it skips (returns the
kept output of) every down / up block deeper than B, the mid block, the down layers of block B at and past L
and the up layers of block B past L. Of the skipped outputs a cached call consumes exactly one: the input of
the first up layer that runs (the output of up block B's layer L + 1, or of up block B + 1 / the mid block
when block B runs whole); every skip connection the running layers read comes from down layers that run.
So a step graph needs one kept tensor per model: the full graph outputs it, the cached graph takes it.

The cached path is made by patching module forwards for the duration of one U-Net call (as DeepCache
wraps them): skipped modules return their input (dead values the ONNX export prunes) and the module whose
output is the kept feature returns the kept tensor. The kept feature crosses the graph boundary in fp32 (it
is the U-Net's own dtype inside).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tstitch_trt.errors import UserError
from tstitch_trt.sampling.cache_plan import MAX_CACHE_BRANCH

CACHE_INPUT, CACHE_OUTPUT = "deep", "deep_next"  # the kept feature: cached graphs read it, full graphs write it
LAYERS_PER_BRANCH_BLOCK = 3  # DeepCacheSDHelper.set_params: cache_layer_id = K % 3, cache_block_id = K // 3


@dataclass(frozen=True)
class CacheBranch:
    """Where a branch id K cuts one U-Net (DeepCacheSDHelper's is_skip_step rules)."""

    branch: int
    block: int  # B, counted from the shallow end
    layer: int  # L, counted from the block's shallow end
    kept: str  # "layer" (an up layer of block B), "up_block" (up block B + 1), "mid" (the mid block)


Structure = tuple[tuple[int, ...], bool]  # (layers of each up block from the shallow end, has a mid block)


def structure(unet: nn.Module) -> Structure:
    n = len(unet.up_blocks)
    return tuple(len(unet.up_blocks[n - 1 - b].resnets) for b in range(n)), unet.mid_block is not None


def config_structure(config: dict[str, Any]) -> Structure:
    """The same from a diffusers UNet2DConditionModel config (checked before any weights load)."""
    n = len(config["up_block_types"])
    lpb = config.get("layers_per_block", 2)
    per_block = list(lpb) if isinstance(lpb, (list, tuple)) else [int(lpb)] * n
    return tuple(int(per_block[b]) + 1 for b in range(n)), config.get("mid_block_type",
                                                                      "UNetMidBlock2DCrossAttn") is not None


def _kept_kind(s: Structure, k: int) -> str:
    layers, has_mid = s
    block, layer = divmod(k, LAYERS_PER_BRANCH_BLOCK)
    if not 0 <= k <= MAX_CACHE_BRANCH or block >= len(layers):
        return "none"
    if layer <= layers[block] - 2:
        return "layer"
    if block + 1 < len(layers):
        return "up_block"
    return "mid" if has_mid else "none"


def check_branch(s: Structure, k: int, name: str = "the U-Net") -> CacheBranch:
    """K's cut of a U-Net of this structure, or one line saying which branches it has (3 per up block from the
    shallow end, less one that would keep a missing mid block: BK-SDM has none)."""
    kind = _kept_kind(s, k)
    if kind == "none":
        valid = [j for j in range(LAYERS_PER_BRANCH_BLOCK * len(s[0])) if _kept_kind(s, j) != "none"]
        raise UserError(f"--cache-branch {k}: {name} has no such DeepCache branch (it has {valid[0]} to "
                        f"{valid[-1]}: 3 per up block, from the shallow end)")
    block, layer = divmod(k, LAYERS_PER_BRANCH_BLOCK)
    return CacheBranch(k, block, layer, kind)


def resolve_branch(unet: nn.Module, k: int, name: str = "the U-Net") -> CacheBranch:
    return check_branch(structure(unet), k, name)


class _Box:
    value: torch.Tensor | None = None


@contextlib.contextmanager
def _patched(patches: list[tuple[nn.Module, Any]]) -> Iterator[None]:
    """Replace forward on each module (an instance attribute, as DeepCache does) and restore it after."""
    saved = [(m, m.__dict__.get("forward")) for m, _ in patches]
    try:
        for m, f in patches:
            m.forward = f
        yield
    finally:
        for m, old in saved:
            if old is None:
                del m.forward
            else:
                m.forward = old


def _kept_module(unet: nn.Module, cut: CacheBranch) -> tuple[nn.Module, bool]:
    """(the module whose output is the kept feature, whether it returns a tuple (a Transformer2DModel))."""
    n_up = len(unet.up_blocks)
    if cut.kept == "mid":
        return unet.mid_block, False
    if cut.kept == "up_block":
        return unet.up_blocks[n_up - 2 - cut.block], False
    up = unet.up_blocks[n_up - 1 - cut.block]
    j = len(up.resnets) - 2 - cut.layer
    attentions = getattr(up, "attentions", None)
    if attentions:
        return attentions[j], True
    return up.resnets[j], False


@contextlib.contextmanager
def keeping(unet: nn.Module, cut: CacheBranch) -> Iterator[_Box]:
    """A full call: the U-Net runs whole; the box gets the kept feature."""
    module, is_tuple = _kept_module(unet, cut)
    box = _Box()
    inner = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        out = inner(*args, **kwargs)
        box.value = out[0] if is_tuple else out
        return out

    with _patched([(module, forward)]):
        yield box


def _identity(first_input_of: str = "hidden_states", tuple_out: bool = False):
    def forward(*args: Any, **kwargs: Any) -> Any:
        h = args[0] if args else kwargs[first_input_of]
        return (h,) if tuple_out else h
    return forward


def _skipped_down_block(block: nn.Module):
    """A whole down block skipped: its input for the hidden state and every output state (dead values)."""
    count = len(block.resnets) + (len(block.downsamplers) if block.downsamplers is not None else 0)

    def forward(*args: Any, **kwargs: Any) -> Any:
        h = args[0] if args else kwargs["hidden_states"]
        return h, (h,) * count
    return forward


def _down_patches(down_blocks: nn.ModuleList, b: int, layer: int) -> list[tuple[nn.Module, Any]]:
    """The down path of a cached call: every block deeper than B, and block B's layers at and past L, skipped."""
    patches: list[tuple[nn.Module, Any]] = []
    for i, down in enumerate(down_blocks):
        if i > b or (i == b and layer == 0):
            patches.append((down, _skipped_down_block(down)))
        elif i == b:
            for j, resnet in enumerate(down.resnets):
                if j >= layer:
                    patches.append((resnet, _identity("input_tensor")))
                    if getattr(down, "attentions", None):
                        patches.append((down.attentions[j], _identity(tuple_out=True)))
            if down.downsamplers is not None and len(down.resnets) >= layer:
                patches += [(d, _identity()) for d in down.downsamplers]
    return patches


def _controlnet_patches(net: nn.Module, cut: CacheBranch, live: int) -> list[tuple[nn.Module, Any]]:
    """A ControlNet on a cached call: its down path mirrors the U-Net's, so the same layers are skipped, and with
    them its mid block and the zero convolutions of the dead residuals. What is left computes the `live` residuals
    exactly as a full call does (each depends only on the ControlNet's layers up to its own)."""
    patches = _down_patches(net.down_blocks, cut.block, cut.layer)
    patches += [(c, _identity("input")) for c in list(net.controlnet_down_blocks)[live:]]
    if net.mid_block is not None:
        patches.append((net.mid_block, _identity()))
    return patches + [(net.controlnet_mid_block, _identity("input"))]


@contextlib.contextmanager
def shallow(unet: nn.Module, cut: CacheBranch, kept: torch.Tensor, controlnet: nn.Module | None = None
            ) -> Iterator[None]:
    """A cached call: only the shallow path runs, fed by `kept` (the U-Net's dtype); of a ControlNet feeding the
    U-Net, only the layers behind the residuals that path reads."""
    n_up = len(unet.up_blocks)
    b, layer = cut.block, cut.layer
    live = live_skips(structure(unet), cut)
    patches = _down_patches(unet.down_blocks, b, layer)
    if controlnet is not None:
        patches += _controlnet_patches(controlnet, cut, live)
    if unet.mid_block is not None:
        patches.append((unet.mid_block, _identity()))
    for bi in range(b + 1, n_up):
        patches.append((unet.up_blocks[n_up - 1 - bi], _identity()))
    up = unet.up_blocks[n_up - 1 - b]
    n = len(up.resnets)
    for j in range(n):
        if n - 1 - j > layer:  # this layer of block B is skipped
            patches.append((up.resnets[j], _identity("input_tensor")))
            if getattr(up, "attentions", None):
                patches.append((up.attentions[j], _identity(tuple_out=True)))
    module, is_tuple = _kept_module(unet, cut)

    def give_kept(*args: Any, **kwargs: Any) -> Any:
        return (kept,) if is_tuple else kept

    patches = [(m, f) for m, f in patches if m is not module] + [(module, give_kept)]
    patches.append((unet, _live_residuals_only(unet.forward, live)))
    with _patched(patches):
        yield


def live_skips(s: Structure, cut: CacheBranch) -> int:
    """How many skip connections (from the shallow end: conv_in's output first) a cached call reads: up layer L'
    of up block B' (both from the shallow end) reads skip sum(layers[:B']) + L', and the running up layers are
    every layer of the blocks shallower than B and layers 0..L of block B."""
    layers = s[0]
    return sum(layers[:cut.block]) + min(cut.layer + 1, layers[cut.block])


def _live_residuals_only(inner: Any, live: int):
    """A ControlNet's residuals on a cached call: the first `live` feed skip connections that the running up layers
    read (computed as on a full call, from the ControlNet's own shallow layers); the rest, and the mid block's,
    land on dead values (the skipped modules' stand-ins, of other shapes), so they become 0-d zeros. The ONNX export
    then prunes whatever of the ControlNet they needed (_controlnet_patches skips those layers outright)."""
    def forward(*args: Any, down_block_additional_residuals: Any = None, mid_block_additional_residual: Any = None,
                **kwargs: Any) -> Any:
        if down_block_additional_residuals is not None:
            down_block_additional_residuals = tuple(
                r if i < live else r.new_zeros(()) for i, r in enumerate(down_block_additional_residuals))
        if mid_block_additional_residual is not None:
            mid_block_additional_residual = mid_block_additional_residual.new_zeros(())
        return inner(*args, down_block_additional_residuals=down_block_additional_residuals,
                     mid_block_additional_residual=mid_block_additional_residual, **kwargs)
    return forward


class CacheStep(nn.Module):
    """A U-Net step module (export/unet_step.UNetStepModule) as DeepCache's full or cached step graph.

    full:   the step's inputs -> the step's outputs + deep_next (the kept feature, fp32)
    cached: the step's inputs + deep -> the step's outputs
    """

    def __init__(self, step: nn.Module, branch: int, mode: str, name: str = "the U-Net"):
        super().__init__()
        if mode not in ("full", "cached"):
            raise ValueError(f"cache step mode {mode!r}")
        self.step, self.mode = step, mode
        self.cut = resolve_branch(step.unet, branch, name)

    @property
    def inputs(self) -> tuple[str, ...]:
        names = tuple(self.step.conditions.inputs)
        return (*names, CACHE_INPUT) if self.mode == "cached" else names

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        named = dict(zip(self.inputs, args, strict=False))
        named.update(kwargs)
        if self.mode == "full":
            with keeping(self.step.unet, self.cut) as box:
                outs = self.step(**named)
            assert box.value is not None
            return (*outs, box.value.float())
        kept = named.pop(CACHE_INPUT).to(self.step.dtype)
        with shallow(self.step.unet, self.cut, kept, self.step.controlnet):
            return self.step(**named)
