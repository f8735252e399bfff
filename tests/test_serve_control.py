"""`tstitch-trt serve` of a ControlNet bundle on loopback (the tiny SD pair with the tiny ControlNet, torch
blocked): /v1/info names the ControlNet fields and the defaults, an uploaded control image gives the images
a lone `tstitch-trt run --control-image` gives, and the web page uploads one from a file input in
Debian's chromium. The request path itself (parsing, batching keys, refusals) is tested in process in
test_serve_conditioning.py.
"""

from __future__ import annotations

import base64
import subprocess
import sys

import numpy as np
import pytest

from serve_harness import browser_page, latents_of, start_service

pytestmark = pytest.mark.serve
STEPS = 3


@pytest.fixture(scope="module")
def svc(control_bundle):
    s = start_service(["--bundle", str(control_bundle), "--backend", "ort", "--max-batch-size", "4"], replicas=1)
    yield s
    left = s.stop()
    assert not left, f"processes survived the service's SIGTERM: {left}"


@pytest.fixture(scope="module")
def edges(control_bundle, tmp_path_factory):
    from PIL import Image

    from tstitch_trt.bundle.manifest import read_manifest

    size = read_manifest(control_bundle).image_size
    path = tmp_path_factory.mktemp("control-image") / "edges.png"
    rgb = np.random.default_rng(3).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def test_info_names_the_controlnet_fields_and_defaults(svc):
    status, info = svc.get_json("/v1/info")
    assert status == 200
    assert info["fields"] == ["prompt", "negative_prompt", "num_images", "control_image", "controlnet_scale",
                              "guess_mode", "control_guidance_start", "control_guidance_end"]
    assert info["defaults"] == {"sampler": "pndm", "cfg_scale": 7.5, "steps": 50}


def test_an_uploaded_control_image_equals_the_cli_run(svc, control_bundle, edges, tmp_path):
    body = {"prompt": "a cat", "steps": STEPS, "seed": 7, "controlnet_scale": 0.8, "return_latents": True,
            "control_image": base64.b64encode(edges.read_bytes()).decode()}
    status, _, out = svc.post(body)
    assert status == 200, out
    npy = tmp_path / "run.npy"
    subprocess.run([sys.executable, "-m", "tstitch_trt.cli", "run", "--bundle", str(control_bundle), "--backend",
                    "ort", "--prompt", "a cat", "--seed", "7", "--steps", str(STEPS), "--control-image", str(edges),
                    "--controlnet-scale", "0.8", "--save-latents", str(npy), "--out", str(tmp_path / "run.png")],
                   check=True, capture_output=True)
    run = np.load(npy)
    np.testing.assert_allclose(latents_of(out), run, rtol=1e-5, atol=1e-5 * np.abs(run).max())
    status, _, out = svc.post({"prompt": "a cat", "steps": STEPS})
    assert status == 400 and out["error"].startswith("this bundle was built with a ControlNet"), out


def test_web_page_uploads_a_control_image(svc, control_bundle, edges, tmp_path):
    """Debian's chromium, headless: the page offers a file input for the control image and sends it."""
    with browser_page(tmp_path / "profile") as page:
        page.goto(svc.url + "/", timeout=60_000)
        page.wait_for_function("document.getElementById('bundle').textContent.startsWith('sd:')")
        control_hidden = page.eval_on_selector("#control-row", "e => e.hidden")
        steps_default = page.input_value("#steps")
        page.fill("#prompt", "a lighthouse")
        page.fill("#steps", "2")
        page.click("#submit")  # no image yet: the service's one line
        page.wait_for_function("document.getElementById('error').textContent !== ''", timeout=60_000)
        refused = page.text_content("#error")
        page.set_input_files("#control_image", str(edges))
        page.click("#submit")
        page.wait_for_selector("#images img", timeout=120_000)
        shown = page.eval_on_selector_all("#images img", "els => els.length")
        error = page.text_content("#error")
    assert control_hidden is False and steps_default == "50"
    assert refused.startswith("400: this bundle was built with a ControlNet"), refused
    assert shown == 1 and not error, error
