"""DiT (Peebles & Xie), parameter-for-parameter compatible with the official checkpoints.

The module tree and parameter names follow facebookresearch/DiT `models.py`, so an
official state dict loads with `load_state_dict(strict=True)` unchanged. Two things
differ from the original, both for export: attention is written out (no timm), and
LayerNorm / softmax statistics and the timestep frequencies are computed in fp32
whatever the weights' dtype, so an fp16 copy of the network stays numerically sane.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DiTConfig:
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    learn_sigma: bool = True
    mlp_ratio: float = 4.0

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DiTConfig:
        return cls(**d)

    def macs_per_forward(self) -> int:
        """Multiply-accumulates of one forward at batch 1 (linear layers and attention)."""
        n, d, p = self.num_tokens, self.hidden_size, self.patch_size
        hidden_mlp = int(d * self.mlp_ratio)
        per_block = n * (3 * d * d + d * d + 2 * d * hidden_mlp) + 2 * n * n * d + 6 * d * d
        embed = n * self.in_channels * p * p * d + 256 * d + d * d
        final = 2 * d * d + n * d * p * p * self.out_channels
        return self.depth * per_block + embed + final


# name -> (depth, hidden, heads). Patch size comes from the "/N" suffix.
_DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "DiT-XL": (28, 1152, 16),
    "DiT-L": (24, 1024, 16),
    "DiT-B": (12, 768, 12),
    "DiT-S": (12, 384, 6),
    # The built-in demo pair (pixel-space MNIST 32x32, patch 4, see tstitch_trt.demo): same family,
    # small sizes; L costs 9.8x the MACs of S per forward (DiT-XL/2 vs DiT-S/2 is 19.6x).
    "DiT-Demo-S": (3, 64, 2),
    "DiT-Demo-L": (8, 128, 4),
}


def dit_arch_names() -> list[str]:
    return [f"{name}/{p}" for name in _DIT_SIZES for p in (2, 4, 8)]


def dit_config(arch: str, **overrides: object) -> DiTConfig:
    """`dit_config("DiT-XL/2", input_size=32, num_classes=1000)`."""
    name, _, patch = arch.partition("/")
    if name not in _DIT_SIZES or patch not in ("2", "4", "8"):
        raise ValueError(f"unknown DiT architecture {arch!r}; known: {', '.join(dit_arch_names())}")
    depth, hidden, heads = _DIT_SIZES[name]
    cfg = DiTConfig(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=int(patch))
    return replace(cfg, **overrides)  # type: ignore[arg-type]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def layer_norm_fp32(x: torch.Tensor, dim: int, eps: float = 1e-6) -> torch.Tensor:
    """Affine-free LayerNorm with fp32 statistics (fp16 variance overflows for large activations)."""
    return F.layer_norm(x.float(), (dim,), eps=eps).to(x.dtype)


class PatchEmbed(nn.Module):
    """Conv patchify; the parameter is named `proj` as in timm, which the checkpoints use."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """Sinusoidal embedding [cos, sin] of t, always in fp32."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.timestep_embedding(t, self.frequency_embedding_size)
        # The official code feeds fp32 frequencies to the MLP; cast so an fp16 network exports.
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row (index num_classes) for the null label of CFG."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = (q * self.scale) @ k.transpose(-2, -1)
        attn = scores.float().softmax(dim=-1).to(v.dtype)  # softmax statistics in fp32
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden_size = hidden_size
        self.attn = Attention(hidden_size, num_heads)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(layer_norm_fp32(x, self.hidden_size), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(layer_norm_fp32(x, self.hidden_size), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(layer_norm_fp32(x, self.hidden_size), shift, scale))


class DiT(nn.Module):
    """Diffusion transformer: (x, t, y) -> (N, out_channels, H, W): eps, then the variance value v."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        c = config
        if c.input_size % c.patch_size:
            raise ValueError(f"input size {c.input_size} is not a multiple of patch size {c.patch_size}")
        self.in_channels = c.in_channels
        self.out_channels = c.out_channels
        self.num_classes = c.num_classes
        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, c.hidden_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size)
        self.y_embedder = LabelEmbedder(c.num_classes, c.hidden_size)
        grid = c.input_size // c.patch_size
        # Fixed sin-cos table; a Parameter (not a buffer) because the checkpoints store it as one.
        self.pos_embed = nn.Parameter(
            torch.from_numpy(sincos_pos_embed_2d(c.hidden_size, grid)).float().unsqueeze(0), requires_grad=False
        )
        self.blocks = nn.ModuleList([DiTBlock(c.hidden_size, c.num_heads, c.mlp_ratio) for _ in range(c.depth)])
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, c.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official init (Xavier linears, adaLN-Zero): a fresh model outputs zeros."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(p.weight)
            nn.init.zeros_(p.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        c, p = self.out_channels, self.config.patch_size
        h = w = self.config.input_size // p
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE's 2-D sin-cos table, (grid*grid, D): first half encodes the row grid (w-major meshgrid)."""
    coords = np.arange(grid_size, dtype=np.float32)
    grid_w, grid_h = np.meshgrid(coords, coords)  # w first, as MAE does
    emb_a = _sincos_1d(embed_dim // 2, grid_w.reshape(-1))
    emb_b = _sincos_1d(embed_dim // 2, grid_h.reshape(-1))
    return np.concatenate([emb_a, emb_b], axis=1)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def randomized_dit(config: DiTConfig, seed: int = 0, scale: float = 1.0) -> DiT:
    """A DiT with EVERY parameter random (adaLN-Zero makes a fresh DiT output zeros, useless for tests).

    Weights ~ N(0, scale / fan_in) keep activations O(1) at any depth; used for tests and timing.
    """
    model = DiT(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            fan_in = p[0].numel() if p.dim() >= 2 else 1
            std = scale / math.sqrt(fan_in) if p.dim() >= 2 else 0.05 * scale
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()
