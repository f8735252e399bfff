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
