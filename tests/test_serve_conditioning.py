"""serve's request path for the issue-12 bundles, in process (no Ray): SDXL time ids, ControlNet images,
LCM guidance. Each served request must equal the pipeline called directly with the same values (the CLI's
path), batch only with requests that share its time ids / control image, and refuse bad input in one line.
The Ray service around this path is tested on the SD bundle in test_serve_sd.py.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

from tstitch_trt.bundle.manifest import read_manifest
from tstitch_trt.errors import UserError
from tstitch_trt.serve.requests import KINDS, parse_generate

STEPS = 3


def _parse(bundle, body: dict):
    return parse_generate(json.dumps(body).encode(), read_manifest(bundle), False, 8)


def _serve(pipe, reqs):
    """validate + one engine batch, as the replica does."""
    kind = KINDS[reqs[0].kind]
    for r in reqs:
        kind.validate(pipe, r)
    return kind.run_batch(pipe, reqs)


@pytest.fixture(scope="module")
def sdxl_pipe(sdxl_bundle):
    from tstitch_trt.pipeline.sd import StitchedSDPipeline

    pipe = StitchedSDPipeline.from_bundle(sdxl_bundle, backend="ort")
    yield pipe
    pipe.close()


def test_sdxl_time_ids_reach_the_pipeline_and_split_batches(sdxl_bundle, sdxl_pipe):
    body = {"prompt": "a cat", "steps": STEPS, "seed": 2, "original_size": [96, 128], "crop_coords": [4, 8],
            "return_latents": True}
    req = _parse(sdxl_bundle, body)
    (served,) = _serve(sdxl_pipe, [req])
    lone = sdxl_pipe(prompt="a cat", steps=STEPS, seed=2, original_size=(96, 128), crop_coords=(4, 8), decode=False)
    np.testing.assert_array_equal(served.latents, lone.latents)
    default = sdxl_pipe(prompt="a cat", steps=STEPS, seed=2, decode=False)
    assert np.abs(default.latents - lone.latents).max() > 1e-4  # the time ids matter: the comparison above can fail
    other = _parse(sdxl_bundle, {**body, "original_size": [64, 64]})
    assert other.batch_key != req.batch_key
    assert _parse(sdxl_bundle, dict(body)).batch_key == req.batch_key


def test_sdxl_batch_mixing_no_negative_and_a_negative_equals_lone_runs(sdxl_bundle, sdxl_pipe):
    a = _parse(sdxl_bundle, {"prompt": "a cat", "steps": STEPS, "seed": 4, "return_latents": True})
    b = _parse(sdxl_bundle, {"prompt": "a dog", "negative_prompt": "blurry", "steps": STEPS, "seed": 5,
                             "return_latents": True})
    assert a.batch_key == b.batch_key
    served = _serve(sdxl_pipe, [a, b])
    # SDXL: no negative prompt means zero uncond embeddings (force_zeros_for_empty_prompt), not ""
    lone_a = sdxl_pipe(prompt="a cat", steps=STEPS, seed=4, decode=False)
    lone_b = sdxl_pipe(prompt="a dog", negative_prompt="blurry", steps=STEPS, seed=5, decode=False)
    for res, lone in ((served[0], lone_a), (served[1], lone_b)):
        err = np.abs(res.latents - lone.latents).max() / np.abs(lone.latents).max()
        assert err < 1e-5, err
    empty = sdxl_pipe(prompt="a cat", negative_prompt="", steps=STEPS, seed=4, decode=False)
    assert np.abs(empty.latents - lone_a.latents).max() > 1e-4


@pytest.mark.parametrize("body, expect", [
    ({"prompt": "x", "original_size": [64]}, "original_size must be a list of two integers"),
    ({"prompt": "x", "crop_coords": "0,0"}, "crop_coords must be a list of two integers"),
    ({"prompt": "x", "control_image": "AAAA"}, "needs a bundle built with --controlnet"),
])
def test_sdxl_bad_fields_are_one_line(sdxl_bundle, body, expect):
    with pytest.raises(UserError, match=expect):
        _parse(sdxl_bundle, body)


def test_time_ids_on_an_sd_bundle_are_refused(sd_bundle):
    with pytest.raises(UserError, match="'original_size' does not apply to this sd bundle"):
        _parse(sd_bundle, {"prompt": "x", "original_size": [64, 64]})


def _png_b64(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def control_pipe(control_bundle):
    from tstitch_trt.pipeline.sd import StitchedSDPipeline

    pipe = StitchedSDPipeline.from_bundle(control_bundle, backend="ort")
    yield pipe
    pipe.close()


def test_a_control_image_upload_equals_the_cli_image(control_bundle, control_pipe, tmp_path):
    from tstitch_trt.pipeline.control import ControlRequest, read_control_image

    size = read_manifest(control_bundle).image_size
    rgb = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    from PIL import Image

    Image.fromarray(rgb).save(tmp_path / "edges.png")
    body = {"prompt": "a cat", "steps": STEPS, "seed": 1, "control_image": "data:image/png;base64," + _png_b64(rgb),
            "controlnet_scale": 0.7, "guess_mode": True, "control_guidance_end": 0.8, "return_latents": True}
    req = _parse(control_bundle, body)
    (served,) = _serve(control_pipe, [req])
    control = ControlRequest(read_control_image(tmp_path / "edges.png"), scale=0.7, guess_mode=True, end=0.8)
    lone = control_pipe(prompt="a cat", steps=STEPS, seed=1, control=control, decode=False)
    np.testing.assert_array_equal(served.latents, lone.latents)
    other = _parse(control_bundle, {**body, "control_image": _png_b64(255 - rgb)})
    assert other.batch_key != req.batch_key  # another image never shares the batch
    assert _parse(control_bundle, {**body, "controlnet_scale": 0.5}).batch_key != req.batch_key


@pytest.mark.parametrize("body, expect", [
    ({"prompt": "x"}, "give \"control_image\""),
    ({"prompt": "x", "control_image": "not base64!"}, "control_image is not base64"),
    ({"prompt": "x", "control_image": base64.b64encode(b"not an image").decode()},
     "control_image is not an image PIL can read"),
])
def test_control_bad_input_is_one_line(control_bundle, body, expect):
    with pytest.raises(UserError, match=expect):
        _parse(control_bundle, body)


def test_a_control_image_of_another_size_is_refused(control_bundle, control_pipe):
    size = read_manifest(control_bundle).image_size
    req = _parse(control_bundle, {"prompt": "x", "steps": STEPS,
                                  "control_image": _png_b64(np.zeros((size, size * 2, 3), np.uint8))})
    with pytest.raises(UserError, match="the control image is"):
        _serve(control_pipe, [req])


def test_lcm_bundles_get_runs_lcm_defaults_and_refusals(lcm_bundle):
    from tstitch_trt.pipeline.sd import StitchedSDPipeline

    req = _parse(lcm_bundle, {"prompt": "a cat", "seed": 3, "return_latents": True})
    # the large pipeline ships an LCMScheduler: lcm, 4 steps, g 1 (the small U-Net has no guidance embedding)
    assert (req.sampler, req.steps, req.cfg_scale) == ("lcm", 4, 1.0)
    pipe = StitchedSDPipeline.from_bundle(lcm_bundle, backend="ort")
    try:
        (served,) = _serve(pipe, [req])
        lone = pipe(prompt="a cat", seed=3, decode=False)
        np.testing.assert_array_equal(served.latents, lone.latents)
        with pytest.raises(UserError, match="negative prompt needs classifier-free guidance"):
            _serve(pipe, [_parse(lcm_bundle, {"prompt": "x", "negative_prompt": "blurry"})])
        with pytest.raises(UserError, match="needs the guidance embedding"):
            _serve(pipe, [_parse(lcm_bundle, {"prompt": "x", "cfg_scale": 3.0})])
    finally:
        pipe.close()
