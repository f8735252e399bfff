"""DiT: official configs, checkpoint formats, diffusers-format conversion, clear mismatch errors."""

from __future__ import annotations

import pickle

import pytest
import torch

from tstitch_trt.errors import UserError
from tstitch_trt.models.checkpoints import load_dit, read_state_dict
from tstitch_trt.models.dit import DiT, dit_arch_names, dit_config, randomized_dit

SMALL = dict(input_size=8, num_classes=10)


@pytest.mark.parametrize(
    "arch, params_m, gmacs",
    [("DiT-S/2", 33.0, 6.06), ("DiT-B/2", 130.5, 23.0), ("DiT-L/2", 458.1, 80.7), ("DiT-XL/2", 675.1, 118.6)],
)
def test_official_sizes(arch: str, params_m: float, gmacs: float) -> None:
    cfg = dit_config(arch, input_size=32, num_classes=1000)
    with torch.device("meta"):
        model = DiT(cfg)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params / 1e6 - params_m) / params_m < 0.002
    # REFERENCE.md's GMACs (DiT paper, fvcore) count linear layers and attention matmuls
    assert abs(cfg.macs_per_forward() / 1e9 - gmacs) / gmacs < 0.03


def test_official_key_names() -> None:
    keys = set(DiT(dit_config("DiT-S/2", **SMALL)).state_dict())
    for k in ["pos_embed", "x_embedder.proj.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.bias",
              "y_embedder.embedding_table.weight", "blocks.11.attn.qkv.weight", "blocks.0.attn.proj.bias",
              "blocks.3.mlp.fc1.weight", "blocks.3.mlp.fc2.weight", "blocks.0.adaLN_modulation.1.weight",
              "final_layer.linear.weight", "final_layer.adaLN_modulation.1.bias"]:
        assert k in keys
    emb = DiT(dit_config("DiT-S/2", **SMALL)).state_dict()["y_embedder.embedding_table.weight"]
    assert emb.shape == (11, 384)  # num_classes + 1 null label


def test_fresh_dit_outputs_zeros_but_randomized_does_not() -> None:
    cfg = dit_config("DiT-S/4", **SMALL)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 10])
    assert DiT(cfg)(x, t, y).abs().max() == 0  # adaLN-Zero
    out = randomized_dit(cfg, seed=0)(x, t, y)
    assert out.shape == (2, 8, 8, 8) and out.abs().max() > 0.1


def test_all_arch_names_build() -> None:
    for name in dit_arch_names():
        if name.startswith(("DiT-S", "DiT-Demo")):
            DiT(dit_config(name, input_size=16, num_classes=10))
    with pytest.raises(ValueError, match="unknown DiT architecture"):
        dit_config("DiT-M/2")


@pytest.mark.parametrize("fmt", ["raw", "ema", "model", "safetensors", "module_prefix"])
def test_checkpoint_formats_load(tmp_path, fmt: str) -> None:
    cfg = dit_config("DiT-S/4", **SMALL)
    model = randomized_dit(cfg, seed=1)
    sd = model.state_dict()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file(sd, str(path))
    else:
        obj = {"raw": sd, "ema": {"ema": sd, "opt": {"lr": torch.tensor(1e-4)}}, "model": {"model": sd},
               "module_prefix": {f"module.{k}": v for k, v in sd.items()}}[fmt]
        path = tmp_path / "w.pt"
        torch.save(obj, path)
    loaded = load_dit(cfg, path)
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.tensor([3])
    torch.testing.assert_close(loaded(x, t, y), model(x, t, y))


def test_mismatch_names_key_and_shapes(tmp_path) -> None:
    path = tmp_path / "s.pt"
    torch.save(randomized_dit(dit_config("DiT-S/4", **SMALL)).state_dict(), path)
    with pytest.raises(UserError, match=r"pos_embed.*\(1, 4, 384\).*\(1, 4, 768\)"):
        load_dit(dit_config("DiT-B/4", **SMALL), path)
    with pytest.raises(UserError, match=r"y_embedder.embedding_table.weight.*\(11, 384\).*\(1001, 384\)"):
        load_dit(dit_config("DiT-S/4", input_size=8, num_classes=1000), path)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_untrusted_pickle_is_refused(tmp_path) -> None:
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"ema": _Evil()}, f)
    with pytest.raises(UserError, match="weights_only=True"):
        read_state_dict(path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError):
        read_state_dict(tmp_path / "junk.pt")
    with pytest.raises(UserError, match="does not exist"):
        read_state_dict(tmp_path / "missing.pt")


def test_diffusers_dit_directory_loads_and_matches_diffusers_forward(tmp_path) -> None:
    diffusers = pytest.importorskip("diffusers")
    hidden, heads, depth = 64, 4, 2
    ref = diffusers.DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=4, out_channels=8,
        num_layers=depth, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    ).eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        # the diffusers conversion copies ONE timestep/class embedder into every block
        e0 = ref.transformer_blocks[0].norm1.emb
        for blk in ref.transformer_blocks[1:]:
            blk.norm1.emb.load_state_dict(e0.state_dict())
    for blk in ref.transformer_blocks:
        # diffusers' DiT spaces frequencies by half-1, the official DiT by half: align the peer
        blk.norm1.emb.time_proj.downscale_freq_shift = 0
    ref.save_pretrained(tmp_path / "dit")
    cfg = dit_config("DiT-S/2", input_size=8, num_classes=10, depth=depth, hidden_size=hidden, num_heads=heads)
    ours = load_dit(cfg, tmp_path / "dit")
    x, t, y = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([3, 777]), torch.tensor([2, 10])
    with torch.no_grad():
        expected = ref(x, timestep=t, class_labels=y).sample
        got = ours(x, t, y)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
