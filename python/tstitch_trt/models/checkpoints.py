"""Load DiT weights from the formats people actually have.

- official DiT `.pt`: a raw state dict, or {"ema": sd} / {"model": sd} (training checkpoints)
- `.safetensors` with the official keys
- a diffusers `DiTTransformer2DModel` directory (config.json + safetensors / bin), keys converted

Never unrestricted pickle: `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from tstitch_trt.errors import UserError
from tstitch_trt.models.dit import DiT, DiTConfig


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Official-key state dict from a .pt / .pth / .safetensors file or a diffusers directory."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint {p} does not exist")
    if p.is_dir():
        return _read_diffusers_dir(p)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(p)))
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise UserError(f"checkpoint {p} is not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"checkpoint {p} cannot be loaded safely with torch.load(weights_only=True): "
            f"{str(e).splitlines()[0]}; convert it to a plain state dict or safetensors"
        ) from None
    if isinstance(obj, Mapping):
        for key in ("ema", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"checkpoint {p} holds no state dict (expected tensors, or an 'ema'/'model' entry)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_dit(config: DiTConfig, path: str | Path) -> DiT:
    """A DiT of `config` with the weights at `path`; a mismatch names the first bad key and both shapes."""
    state = read_state_dict(path)
    with torch.device("meta"):  # no throwaway random init: peak memory is one copy of the weights
        model = DiT(config)
    check_state_dict(model, state, source=str(path))
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def save_dit(model: torch.nn.Module, path: str | Path) -> None:
    """The state dict as safetensors (what load_dit and the bundle's torch entry read)."""
    from safetensors.torch import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise UserError(
                f"{source}: missing key {key!r} (expected shape {tuple(tensor.shape)}); wrong architecture?"
            )
        if not state[key].is_floating_point() and tensor.is_floating_point():
            raise UserError(f"{source}: key {key!r} holds {str(state[key].dtype).removeprefix('torch.')} values; "
                            "model weights must be floating point (a corrupted or foreign checkpoint?)")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise UserError(
                f"{source}: key {key!r} has shape {tuple(state[key].shape)} but the architecture expects "
                f"{tuple(tensor.shape)}; check the model name, --image-size and --num-classes"
            )
    extra = [k for k in state if k not in expected]
    if extra:
        shape = tuple(state[extra[0]].shape)
        raise UserError(f"{source}: unexpected key {extra[0]!r} (shape {shape}); wrong architecture?")


def config_from_diffusers(path: str | Path) -> dict:
    """The diffusers DiT config.json as a dict (for sizes: sample_size, patch_size, ...)."""
    return json.loads((Path(path) / "config.json").read_text())


def _read_diffusers_dir(d: Path) -> dict[str, torch.Tensor]:
    if not (d / "config.json").exists():
        raise UserError(f"{d} is a directory but not a diffusers model (no config.json)")
    files = sorted(d.glob("*.safetensors"))
    raw: dict[str, torch.Tensor] = {}
    if files:
        from safetensors.torch import load_file

        for f in files:
            raw.update(load_file(str(f)))
    else:
        bins = sorted(d.glob("*.bin"))
        if not bins:
            raise UserError(f"{d} has a config.json but no weights (*.safetensors or *.bin)")
        for f in bins:
            raw.update(torch.load(str(f), map_location="cpu", weights_only=True))
    cfg = config_from_diffusers(d)
    try:
        return diffusers_to_official(raw, depth=int(cfg["num_layers"]), input_size=int(cfg["sample_size"]),
                                     patch_size=int(cfg["patch_size"]))
    except KeyError as e:
        raise UserError(f"{d}: not a diffusers DiT (missing {e.args[0]!r})") from None


def diffusers_to_official(sd: Mapping[str, torch.Tensor], depth: int, input_size: int,
                          patch_size: int) -> dict[str, torch.Tensor]:
    """Invert diffusers' DiT conversion: per-block copies of the embedders collapse to one, q/k/v fuse."""
    from tstitch_trt.models.dit import sincos_pos_embed_2d

    emb = "transformer_blocks.0.norm1.emb."
    out: dict[str, torch.Tensor] = {
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
        "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "t_embedder.mlp.0.weight": sd[emb + "timestep_embedder.linear_1.weight"],
        "t_embedder.mlp.0.bias": sd[emb + "timestep_embedder.linear_1.bias"],
        "t_embedder.mlp.2.weight": sd[emb + "timestep_embedder.linear_2.weight"],
        "t_embedder.mlp.2.bias": sd[emb + "timestep_embedder.linear_2.bias"],
        "y_embedder.embedding_table.weight": sd[emb + "class_embedder.embedding_table.weight"],
        "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
        "final_layer.linear.weight": sd["proj_out_2.weight"],
        "final_layer.linear.bias": sd["proj_out_2.bias"],
    }
    hidden = out["x_embedder.proj.weight"].shape[0]
    grid = input_size // patch_size
    out["pos_embed"] = torch.from_numpy(sincos_pos_embed_2d(hidden, grid)).float().unsqueeze(0)
    for i in range(depth):
        b = f"transformer_blocks.{i}."
        o = f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[o + f"attn.qkv.{kind}"] = torch.cat(
                [sd[b + f"attn1.to_q.{kind}"], sd[b + f"attn1.to_k.{kind}"], sd[b + f"attn1.to_v.{kind}"]], dim=0
            )
            out[o + f"attn.proj.{kind}"] = sd[b + f"attn1.to_out.0.{kind}"]
            out[o + f"mlp.fc1.{kind}"] = sd[b + f"ff.net.0.proj.{kind}"]
            out[o + f"mlp.fc2.{kind}"] = sd[b + f"ff.net.2.{kind}"]
            out[o + f"adaLN_modulation.1.{kind}"] = sd[b + f"norm1.linear.{kind}"]
    return out
