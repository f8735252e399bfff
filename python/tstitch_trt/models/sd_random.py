"""Random SD 1.x parts saved as diffusers directories: tests, benchmarks, and trying the CLI offline.

- tiny: diffusers' own test components (tests/pipelines/stable_diffusion/test_stable_diffusion.py
  get_dummy_components), every parameter randomized (no zero init);
- bk-sdm-tiny / sd15: U-Nets with the real architectures (random weights) for timing;
- a REAL CLIP BPE tokenizer built offline from open_clip_torch's vocabulary file (read from the
  installed wheel without importing open_clip, which would need torchvision).

    python -m tstitch_trt.models.sd_random OUT_DIR          # OUT_DIR/small-unet, OUT_DIR/large-pipeline
    python -m tstitch_trt.models.sd_random --sdxl OUT_DIR   # OUT_DIR/small-sdxl-unet, OUT_DIR/large-sdxl-pipeline
    python -m tstitch_trt.models.sd_random [--sdxl] --controlnet OUT_DIR   # + a tiny ControlNet that fits both
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
from pathlib import Path

import torch

from tstitch_trt.models.sd import randomize_

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}
SPECIALS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>"}


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def open_clip_vocab_file() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip_torch is not installed (pip install --no-deps open_clip_torch)")
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


def write_clip_tokenizer(out: Path) -> Path:
    """vocab.json, merges.txt, tokenizer_config.json of the CLIP tokenizer (49408 ids, 77 tokens)."""
    lines = gzip.open(open_clip_vocab_file()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True, **SPECIALS}))
    (out / "special_tokens_map.json").write_text(json.dumps(SPECIALS))
    return out


def tiny_unet(seed: int, small: bool, time_cond_proj_dim: int | None = None, layers_per_block: int | None = None):
    """diffusers' dummy SD U-Net; the small one drops the mid block (BK-SDM-Small's change), the large
    one has two layers per block (layers_per_block: the small one's, default 1); time_cond_proj_dim: LCM's
    guidance embedding width."""
    from diffusers import UNet2DConditionModel

    layers = (layers_per_block or 1) if small else 2
    unet = UNet2DConditionModel(time_cond_proj_dim=time_cond_proj_dim,
        block_out_channels=(4, 8), layers_per_block=layers, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=2, mid_block_type=None if small else "UNetMidBlock2DCrossAttn")
    return randomize_(unet, seed).eval()


# The real U-Net architectures (diffusers UNet2DConditionModel configs), for timing with random weights.
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "cross_attention_dim": 768,
    "attention_head_dim": 8, "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}
# BK-SDM-Tiny (nota-ai): SD 1.5 with one layer per block, no mid block, the innermost level removed.
BK_SDM_TINY_UNET = {
    **SD15_UNET, "layers_per_block": 1, "mid_block_type": None, "block_out_channels": (320, 640, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3, "up_block_types": ("CrossAttnUpBlock2D",) * 3,
}
UNET_CONFIGS = {"sd15": SD15_UNET, "bk-sdm-tiny": BK_SDM_TINY_UNET}


def random_unet(name: str, seed: int = 0, device: str = "cpu"):
    """A UNet2DConditionModel with the architecture `name` (UNET_CONFIGS) and every parameter random, built
    and drawn on `device` (an SDXL U-Net is 2.6 G parameters: slow to initialise on a CPU)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel(**UNET_CONFIGS[name])
    return randomize_(unet, seed).eval()


def save_tiny_pair(root: Path, cross_attention_dim: int = 32, lcm: bool = False, small_layers_per_block: int = 1
                   ) -> tuple[Path, Path]:
    """(small bare U-Net dir, large full pipeline dir) under `root`. lcm: the large is an SD 1.x LCM
    pipeline (LatentConsistencyModelPipeline, LCMScheduler) whose U-Net takes the guidance embedding
    (time_cond_proj_dim); the small stays a plain U-Net, as the LCM-LoRA small model of T-Stitch's LCM pair.
    small_layers_per_block 2: the small U-Net gets the large one's residual layout (one ControlNet fits both)."""
    from diffusers import AutoencoderKL, LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline
    from diffusers.schedulers import PNDMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    small_dir, large_dir = root / "small-unet", root / "large-pipeline"
    tiny_unet(1, small=True, layers_per_block=small_layers_per_block).save_pretrained(str(small_dir))
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=2)
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                                        hidden_size=cross_attention_dim, intermediate_size=37, layer_norm_eps=1e-05,
                                        num_attention_heads=4, num_hidden_layers=5, vocab_size=49408,
                                        max_position_embeddings=77))
    tok = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(root / "clip-tokenizer")))
    parts = {"vae": randomize_(vae, 3).eval(), "text_encoder": randomize_(text, 4).eval(), "tokenizer": tok,
             "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    if lcm:
        pipe = LatentConsistencyModelPipeline(unet=lcm_tiny_unet(2, small=False),
                                              scheduler=LCMScheduler.from_config(SD15_SCHEDULER), **parts)
    else:
        pipe = StableDiffusionPipeline(unet=tiny_unet(2, small=False),
                                       scheduler=PNDMScheduler.from_config(SD15_SCHEDULER), **parts)
    pipe.save_pretrained(str(large_dir))
    return small_dir, large_dir


# The wide pair's time-embedding width: its U-Net's time_embedding.linear_2 is WIDE x WIDE fp32, 2.15 GB, so
# the large step graph crosses protobuf's 2 GB limit while a step costs one 1 x WIDE x WIDE matmul (CI: ms).
WIDE_TIME_EMBED_DIM = 23200


def save_wide_pair(root: Path, time_embedding_dim: int = WIDE_TIME_EMBED_DIM) -> tuple[Path, Path]:
    """save_tiny_pair, with the large U-Net's time embedding `time_embedding_dim` wide: a step graph over
    2 GB of weights at the compute of a tiny one (the >2 GB path, end to end, in seconds)."""
    from diffusers import UNet2DConditionModel

    small, large = save_tiny_pair(root)
    config = dict(UNet2DConditionModel.load_config(str(large / "unet")))
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config["time_embedding_dim"] = time_embedding_dim
    with torch.device("meta"):  # no init of 538 M parameters that randomize_ overwrites anyway
        unet = UNet2DConditionModel(**config)
    unet = unet.to_empty(device="cpu")
    randomize_(unet, 5).eval().save_pretrained(str(large / "unet"), safe_serialization=True)
    del unet
    return small, large


LCM_EMBED_DIM = 32  # the tiny LCM U-Net's time_cond_proj_dim (LCM-SDXL / Dreamshaper: 256)


def with_guidance_embedding(unet, seed: int):
    """A copy of `unet` with LCM's guidance embedding (time_cond_proj_dim LCM_EMBED_DIM): the same weights plus
    a random projection, scaled up (x10): the tiny U-Nets' GroupNorms absorb most of a time-embedding change,
    and this makes the guidance value move a 2-8 step LCM result by 2e-3 to 6e-3 of its magnitude instead of
    5e-4 to 1e-3, well beyond the 1e-4 conformance tolerance."""
    from diffusers import UNet2DConditionModel

    out = UNet2DConditionModel.from_config({**unet.config, "time_cond_proj_dim": LCM_EMBED_DIM})
    missing = out.load_state_dict(unet.state_dict(), strict=False).missing_keys
    assert missing == ["time_embedding.cond_proj.weight"], missing
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = out.time_embedding.cond_proj.weight
        w.copy_(10.0 * torch.randn(w.shape, generator=gen) / math.sqrt(w.shape[1]))
    return out.eval()


def lcm_tiny_unet(seed: int, small: bool):
    """tiny_unet with LCM's guidance embedding (with_guidance_embedding)."""
    return with_guidance_embedding(tiny_unet(seed, small), seed)


LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "time_emb_proj")  # the modules lcm-lora-sdv1-5 / lcm-lora-ssd-1b adapt


def save_random_lora(unet_dir: Path, out: Path, seed: int = 7, rank: int = 4, alpha: float = 8.0) -> Path:
    """A random LoRA for the U-Net in `unet_dir`, written in diffusers' format (save_lora_weights: "unet."
    PEFT keys + adapter metadata), every LoRA weight random (PEFT zero-inits lora_B: a no-op LoRA)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(str(unet_dir))
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(LORA_TARGETS), init_lora_weights=False)
    unet.add_adapter(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
    StableDiffusionPipeline.save_lora_weights(str(out), unet_lora_layers=get_peft_model_state_dict(unet),
                                              unet_lora_adapter_metadata=config.to_dict())
    return out / "pytorch_lora_weights.safetensors"


def tiny_controlnet(seed: int, cross_attention_dim: int = 32):
    """diffusers' dummy SD ControlNet (tests/pipelines/controlnet/test_controlnet.py get_dummy_components), every
    parameter randomized (its zero convolutions too). It fits the tiny large U-Net's residual layout."""
    from diffusers import ControlNetModel

    net = ControlNetModel(block_out_channels=(4, 8), layers_per_block=2, in_channels=4,
                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                          cross_attention_dim=cross_attention_dim, conditioning_embedding_out_channels=(16, 32),
                          norm_num_groups=1)
    return randomize_(net, seed).eval()


def save_tiny_control_set(root: Path) -> tuple[Path, Path, Path]:
    """(small U-Net dir, large pipeline dir, ControlNet dir): the tiny pair with a small U-Net of two layers per
    block and no mid block, so one ControlNet fits both (as SSD-1B and SDXL share a layout), and the ControlNet."""
    small, large = save_tiny_pair(root, small_layers_per_block=2)
    net_dir = root / "controlnet"
    tiny_controlnet(5).save_pretrained(str(net_dir))
    return small, large, net_dir


# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
    "use_karras_sigmas": False,
}
# The SDXL base U-Net (stable-diffusion-xl-base-1.0 unet/config.json; 2567.5M parameters) ...
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "cross_attention_dim": 2048,
    "attention_head_dim": (5, 10, 20), "block_out_channels": (320, 640, 1280), "use_linear_projection": True,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
}
# ... and SSD-1B's (segmind): transformer blocks 2/4 down, 4/4/10 and 2/1/1 up, a mid block without attention
# (ComfyUI's SSD_1B detection: transformer_depth [0,0,2,2,4,4], output [0,0,0,1,1,2,10,4,4], middle -1).
SSD_1B_UNET = {
    **SDXL_UNET, "transformer_layers_per_block": (1, 2, 4),
    "reverse_transformer_layers_per_block": ((4, 4, 10), (2, 1, 1), (1, 1, 1)), "mid_block_type": "UNetMidBlock2D",
}
UNET_CONFIGS.update({"sdxl": SDXL_UNET, "ssd-1b": SSD_1B_UNET})


def tiny_sdxl_unet(seed: int, small: bool):
    """diffusers' dummy SDXL U-Net (tests/pipelines/stable_diffusion_xl get_dummy_components); the small one is
    reduced as SSD-1B reduces SDXL: fewer transformer layers, a mid block without attention."""
    from diffusers import UNet2DConditionModel

    cfg = dict(block_out_channels=(2, 4), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D",
                                                                                         "UpBlock2D"),
               attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
               addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
               projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=1)
    if small:
        cfg.update(transformer_layers_per_block=(1, 1), reverse_transformer_layers_per_block=((1, 1, 2), (1, 1, 1)),
                   mid_block_type="UNetMidBlock2D")
    return randomize_(UNet2DConditionModel(**cfg), seed).eval()


def save_tiny_sdxl_pair(root: Path, force_zeros_for_empty_prompt: bool = True) -> tuple[Path, Path]:
    """(small bare SDXL U-Net dir, large full StableDiffusionXLPipeline dir) under `root`: diffusers' dummy SDXL
    components (two CLIP text encoders of width 32, projection 32; VAE (32, 64), factor 2), every parameter
    random, the real CLIP tokenizer twice (tokenizer_2 pads with "!", id 0, as SDXL's does)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    small_dir, large_dir = root / "small-sdxl-unet", root / "large-sdxl-pipeline"
    tiny_sdxl_unet(11, small=True).save_pretrained(str(small_dir))
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, sample_size=128, scaling_factor=0.13025,
                        force_upcast=False)  # as an fp16-fix VAE: the engine build's fp16 probe decides

    def clip_config() -> CLIPTextConfig:
        return CLIPTextConfig(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32,
                              intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5,
                              vocab_size=49408, max_position_embeddings=77, hidden_act="gelu", projection_dim=32)

    tok_dir = write_clip_tokenizer(root / "clip-tokenizer")
    tok = CLIPTokenizer.from_pretrained(str(tok_dir))
    tok_2 = CLIPTokenizer.from_pretrained(str(tok_dir), pad_token="!")
    pipe = StableDiffusionXLPipeline(
        vae=randomize_(vae, 13).eval(), text_encoder=randomize_(CLIPTextModel(clip_config()), 14).eval(),
        text_encoder_2=randomize_(CLIPTextModelWithProjection(clip_config()), 15).eval(), tokenizer=tok,
        tokenizer_2=tok_2, unet=tiny_sdxl_unet(12, small=False),
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
    pipe.save_pretrained(str(large_dir))
    return small_dir, large_dir


def tiny_sdxl_controlnet(unet, seed: int):
    """diffusers' dummy SDXL ControlNet (tests/pipelines/controlnet/test_controlnet_sdxl.py: the dummy SDXL U-Net's
    config + conditioning_embedding_out_channels (16, 32)), made from `unet`'s config, every parameter random."""
    from diffusers import ControlNetModel

    return randomize_(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32)), seed).eval()


def save_tiny_sdxl_control_set(root: Path) -> tuple[Path, Path, Path]:
    """(small SDXL U-Net dir, large SDXL pipeline dir, SDXL ControlNet dir): the small U-Net already has the large
    one's residual layout (SSD-1B's reduction), so one ControlNet fits both."""
    small, large = save_tiny_sdxl_pair(root)
    net_dir = root / "sdxl-controlnet"
    tiny_sdxl_controlnet(tiny_sdxl_unet(12, small=False), 16).save_pretrained(str(net_dir))
    return small, large, net_dir


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m tstitch_trt.models.sd_random",
                                description="write a tiny random SD pair (bare small U-Net + full large pipeline)")
    p.add_argument("out", type=Path)
    p.add_argument("--sdxl", action="store_true", help="an SDXL pair (StableDiffusionXLPipeline) instead of SD 1.x")
    p.add_argument("--lcm", action="store_true", help="SD 1.x: the large is an LCM pipeline (guidance embedding, "
                   "LCMScheduler); also write a random LoRA for the small U-Net under OUT/lora")
    p.add_argument("--controlnet", action="store_true",
                   help="also write a tiny ControlNet (OUT_DIR/controlnet or OUT_DIR/sdxl-controlnet) that fits both "
                        "U-Nets (the SD 1.x small U-Net then gets the large one's layout)")
    args = p.parse_args(argv)
    if args.sdxl and args.lcm:
        p.error("--lcm writes an SD 1.x LCM pair; it does not combine with --sdxl")
    if args.controlnet and args.lcm:
        p.error("--lcm and --controlnet write different tiny sets; give one")
    if args.controlnet:
        small, large, net = (save_tiny_sdxl_control_set if args.sdxl else save_tiny_control_set)(args.out)
        print(f"wrote {small}, {large} and {net}")
        return 0
    small, large = save_tiny_sdxl_pair(args.out) if args.sdxl else save_tiny_pair(args.out, lcm=args.lcm)
    print(f"wrote {small} and {large}")
    if args.lcm:
        print(f"wrote {save_random_lora(small, args.out / 'lora')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
