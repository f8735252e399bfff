"""The bundle's torch artifacts (export/torch_dirs.py): the source's safetensors hard-linked where the model is what
the source holds (no second copy of an SDXL pair's 19 GB), saved as one unsharded file otherwise."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("diffusers")

from tstitch_trt.export.torch_dirs import save_model_dir  # noqa: E402


def test_sdxl_build_links_every_torch_artifact_to_its_source(sdxl_pair, sdxl_bundle):
    small, large = sdxl_pair
    manifest = json.loads((sdxl_bundle / "manifest.json").read_text())
    parts = [(m["engines"]["torch"], small if i == 0 else large / "unet") for i, m in enumerate(manifest["models"])]
    parts += [(manifest[p]["engines"]["torch"], large / p) for p in ("text_encoder", "text_encoder_2", "vae")]
    for entry, src in parts:
        [weights] = list(src.glob("*.safetensors"))
        assert os.path.samefile(sdxl_bundle / entry["file"], weights), entry["file"]
        assert (sdxl_bundle / entry["extra"]["dir"] / "config.json").read_bytes() == (src / "config.json").read_bytes()


def _tiny_vae():
    from tstitch_trt.export.vae_export import randomized_vae

    return randomized_vae((8, 16))


def test_a_changed_model_is_saved_not_linked(tmp_path):
    vae = _tiny_vae()
    vae.save_pretrained(str(tmp_path / "src"))
    entry = save_model_dir(vae, tmp_path / "bundle", "vae/diffusers", source=None)
    saved = tmp_path / "bundle" / entry.file
    assert not os.path.samefile(saved, tmp_path / "src" / "diffusion_pytorch_model.safetensors")
    assert saved.read_bytes() == (tmp_path / "src" / "diffusion_pytorch_model.safetensors").read_bytes()


def test_a_source_with_several_weights_files_is_saved_as_one(tmp_path):
    """A sharded source (here: a second safetensors file) is not linked; the save is one file (UNSHARDED)."""
    vae = _tiny_vae()
    vae.save_pretrained(str(tmp_path / "src"), max_shard_size=20_000)  # sharded: several files and an index
    assert len(list((tmp_path / "src").glob("*.safetensors"))) > 1
    entry = save_model_dir(vae, tmp_path / "bundle", "vae/diffusers", source=tmp_path / "src")
    files = list((tmp_path / "bundle" / "vae" / "diffusers").glob("*.safetensors"))
    assert [tmp_path / "bundle" / entry.file] == files
    assert all(os.stat(f).st_nlink == 1 for f in files)


def test_controlnet_build_links_the_controlnet_to_its_source(control_set, control_bundle):
    """The ControlNet is loaded unchanged, so its torch artifact is its source's file (SD 1.5's is 1.4 GB), not
    a second copy; and the bundle still loads it (the torch backend's check runs on it in test_controlnet.py)."""
    net_dir = control_set[2]
    entry = json.loads((control_bundle / "manifest.json").read_text())["conditioning"]["controlnet"]["engines"]["torch"]
    [weights] = list(net_dir.glob("*.safetensors"))
    assert os.path.samefile(control_bundle / entry["file"], weights)
    config = (control_bundle / entry["extra"]["dir"] / "config.json").read_bytes()
    assert config == (net_dir / "config.json").read_bytes()


def _tiny_dit():
    from tstitch_trt.models.dit import dit_config, randomized_dit

    return randomized_dit(dit_config("DiT-S/2", input_size=8, num_classes=10), seed=2)


def test_dit_checkpoint_in_the_saved_form_is_linked(tmp_path):
    """A DiT loaded unchanged from a safetensors checkpoint of its own keys (fp32) links it: DiT-XL/2's 2.7 GB
    are not copied; anything else (fp16 weights, a .pt, no source) is written by save_dit and loads the same."""
    import torch

    from tstitch_trt.export.torch_dirs import save_dit_file
    from tstitch_trt.models.checkpoints import read_state_dict, save_dit

    net = _tiny_dit()
    save_dit(net, tmp_path / "src.safetensors")
    save_dit_file(net, tmp_path / "linked.safetensors", tmp_path / "src.safetensors")
    assert os.path.samefile(tmp_path / "linked.safetensors", tmp_path / "src.safetensors")
    half = {k: v.half() for k, v in net.state_dict().items()}
    from safetensors.torch import save_file

    save_file(half, str(tmp_path / "half.safetensors"))
    torch.save(net.state_dict(), tmp_path / "src.pt")
    for i, source in enumerate([tmp_path / "half.safetensors", tmp_path / "src.pt", None]):
        dst = tmp_path / f"saved-{i}.safetensors"
        save_dit_file(net, dst, source)
        assert os.stat(dst).st_nlink == 1
        got = read_state_dict(dst)
        assert all(torch.equal(got[k], v) for k, v in net.state_dict().items())


def test_dit_build_links_a_safetensors_checkpoint(tmp_path):
    """build from DiT checkpoints in save_dit's form: the bundle's torch weights are the checkpoints themselves,
    and the bundle opens (checksums) and loads them."""
    from tstitch_trt.bundle.manifest import read_manifest, verify_bundle
    from tstitch_trt.export.build import BuildConfig, ModelSpec, build_bundle
    from tstitch_trt.export.torch_backend import iter_step_modules
    from tstitch_trt.models.checkpoints import save_dit

    net = _tiny_dit()
    save_dit(net, tmp_path / "s.safetensors")
    save_dit(net, tmp_path / "b.safetensors")
    out = tmp_path / "bundle"
    build_bundle(BuildConfig([ModelSpec("DiT-S/2", str(tmp_path / "s.safetensors")),
                              ModelSpec("DiT-S/2", str(tmp_path / "b.safetensors"))], out, backends=["torch"],
                             image_size=64, num_classes=10, batch_range=(1, 2)))
    manifest = read_manifest(out)
    for m, src in zip(manifest.models, ("s", "b"), strict=True):
        assert os.path.samefile(out / m.engines["torch"].file, tmp_path / f"{src}.safetensors")
    verify_bundle(out, manifest, fresh=True)
    assert len(list(iter_step_modules(out, manifest))) == 2
