"""`tstitch-trt serve` of a text-to-image (SD) bundle on loopback: the tiny random SD pair (conftest's
sd_bundle), torch blocked in every service process. The API with run's SD defaults, bad input (the
CLI's messages), batching invariance (a batched request equals a lone `tstitch-trt run --prompt`,
ddim eta > 0 included) and the web page's prompt box.

One service for the module; stopping it must leave no process.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serve_harness import browser_page, latents_of, png_of, start_service

pytestmark = pytest.mark.serve
STEPS = 3
BODY_TIMEOUT_S = 4


@pytest.fixture(scope="module")
def svc(sd_bundle):
    # the bundle's engines take batches of 1-4 images; a long batch wait so concurrent requests share one
    s = start_service(["--bundle", str(sd_bundle), "--backend", "ort", "--max-batch-size", "4",
                       "--batch-wait-ms", "400", "--body-timeout-s", str(BODY_TIMEOUT_S)], replicas=1)
    yield s
    left = s.stop()
    assert not left, f"processes survived the service's SIGTERM: {left}"


@pytest.fixture(scope="module")
def manifest(sd_bundle):
    from tstitch_trt.bundle.manifest import read_manifest

    return read_manifest(sd_bundle)


def _assert_healthy(svc) -> None:
    status, body = svc.get_json("/health")
    assert status == 200 and body["status"] == "ok", body


def test_health_and_info_name_the_sd_bundle(svc):
    status, body = svc.get_json("/health")
    assert status == 200 and body["pipeline"] == "sd" and body["backend"] == "ort"
    blocked = {int(v) for v in svc.blocker_log.read_text().split()}
    assert body["pid"] in blocked and body["torch_imported"] is False
    status, info = svc.get_json("/v1/info")
    assert status == 200 and info["pipeline"] == "sd"
    assert info["fields"] == ["prompt", "negative_prompt", "num_images"]


def test_generate_uses_runs_sd_defaults(svc, manifest):
    from tstitch_trt.sampling.sd_samplers import default_sampler

    status, _, body = svc.post({"prompt": "a cat", "num_images": 2, "steps": STEPS, "seed": 3})
    assert status == 200, body
    size = manifest.image_size
    imgs = [png_of(b) for b in body["images"]]
    assert [im.shape for im in imgs] == [(size, size, 3)] * 2
    rep = body["report"]
    assert rep["pipeline"] == "sd" and rep["prompts"] == ["a cat", "a cat"] and rep["negative_prompts"] == ["", ""]
    assert rep["sampler"] == default_sampler(manifest.scheduler) and rep["cfg_scale"] == 7.5
    assert rep["ratio"] == 0.4 and rep["steps"] == STEPS and rep["batch"] == 2 and rep["batch_size"] >= 2
    assert (rep["height"], rep["width"]) == (size, size) and rep["compute_ms"] > 0


def test_a_size_other_than_the_bundles_is_served(svc, manifest):
    h, w = manifest.image_size // 2, manifest.image_size
    status, _, body = svc.post({"prompt": "a dog", "steps": 2, "height": h, "width": w})
    assert status == 200, body
    rep = body["report"]
    assert png_of(body["images"][0]).shape == (h, w, 3) and (rep["height"], rep["width"]) == (h, w)


@pytest.mark.parametrize("body, expect", [
    ({"class_labels": [1, 2]}, "'class_labels' does not apply to this sd bundle; it takes prompt"),
    ({"steps": 2}, "give \"prompt\""),
    ({"prompt": 7}, "prompt must be a string or a list of strings"),
    ({"prompt": "a cat", "ratio": 1.5}, "--ratio must be in [0, 1]"),
    ({"prompt": "a cat", "height": 33}, "--height 33 is not a positive multiple of the VAE factor"),
    ({"prompt": "a cat", "sampler": "ddpm"}, "unknown sampler 'ddpm' for an SD bundle"),
    ({"prompt": "a cat", "num_images": 0}, "--num-images >= 1"),
    ({"prompt": ["a", "b"], "num_images": 3}, "2 prompts x 3 images = 6 images"),
    ({"prompt": ["a", "b"], "negative_prompt": ["x", "y", "z"]}, "3 negative prompts for 2 prompts"),
    ({"prompt": "a cat", "colour": "red"}, "unknown field 'colour'"),
])
def test_bad_input_is_a_400_with_one_line_and_the_service_stays_healthy(svc, body, expect):
    status, _, out = svc.post(body)
    assert status == 400, out
    assert expect in out["error"] and "\n" not in out["error"], out
    _assert_healthy(svc)


def test_messages_are_the_cli_messages(svc, sd_bundle, tmp_path):
    r = subprocess.run([sys.executable, "-m", "tstitch_trt.cli", "run", "--bundle", str(sd_bundle), "--backend", "ort",
                        "--prompt", "a cat", "--steps", "2", "--height", "33", "--out", str(tmp_path / "x.png")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    _, _, out = svc.post({"prompt": "a cat", "steps": 2, "height": 33})
    assert out["error"] in r.stderr, (out, r.stderr)


def test_batched_requests_equal_lone_runs(svc, sd_bundle, manifest, tmp_path):
    """Concurrent compatible requests share engine batches; each one's latents equal a lone run with its
    seed, prompts and negative prompts (ddim with eta > 0 draws per-step noise: per request too)."""
    from tstitch_trt.pipeline.sd import StitchedSDPipeline
    from tstitch_trt.sampling.sd_samplers import default_sampler

    reqs = [{"prompt": "a red cube", "seed": 11}, {"prompt": ["a cat", "a dog"], "seed": 12},
            {"prompt": "a tree", "negative_prompt": "blurry", "seed": 13},
            {"prompt": "a boat", "sampler": "ddim", "eta": 1.0, "seed": 21},
            {"prompt": "a car", "num_images": 2, "sampler": "ddim", "eta": 1.0, "seed": 22}]
    for r in reqs:
        r.update(steps=STEPS, return_latents=True)
    with ThreadPoolExecutor(len(reqs)) as ex:
        answers = list(ex.map(svc.post, reqs))
    assert all(a[0] == 200 for a in answers), [a[2] for a in answers if a[0] != 200]
    reports = [a[2]["report"] for a in answers]
    assert max(r["batch_size"] - r["batch"] for r in reports) > 0, [r["batch_size"] for r in reports]
    # only compatible requests share a batch (the eta > 0 ones have 3 images between them), at most the
    # 4 images the engines take
    assert all(r["batch_size"] <= (3 if "eta" in q else 4) for q, r in zip(reqs, reports, strict=True))

    pipe = StitchedSDPipeline.from_bundle(sd_bundle, backend="ort")
    try:
        for req, (_, _, body) in zip(reqs, answers, strict=True):
            alone = pipe(prompt=req["prompt"], negative_prompt=req.get("negative_prompt"),
                         num_images=req.get("num_images", 1), steps=STEPS, seed=req["seed"], ratio=0.4,
                         sampler=req.get("sampler", default_sampler(manifest.scheduler)), eta=req.get("eta", 0.0),
                         progress=False).latents
            np.testing.assert_allclose(latents_of(body), alone, rtol=1e-5, atol=1e-5 * np.abs(alone).max())
    finally:
        pipe.close()

    # and literally `tstitch-trt run --prompt ... --seed S` for one of them
    npy = tmp_path / "run.npy"
    subprocess.run([sys.executable, "-m", "tstitch_trt.cli", "run", "--bundle", str(sd_bundle), "--backend", "ort",
                    "--prompt", "a tree", "--negative-prompt", "blurry", "--seed", "13", "--steps", str(STEPS),
                    "--save-latents", str(npy), "--out", str(tmp_path / "run.png")], check=True, capture_output=True)
    run = np.load(npy)
    np.testing.assert_allclose(latents_of(answers[2][2]), run, rtol=1e-5, atol=1e-5 * np.abs(run).max())



def test_web_page_shows_a_prompt_box(svc, manifest, tmp_path):
    """Debian's chromium, headless: the page of an SD bundle asks for a prompt, submits it, shows the image."""
    with browser_page(tmp_path / "profile") as page:
        page.goto(svc.url + "/", timeout=60_000)
        page.wait_for_function("document.getElementById('bundle').textContent.startsWith('sd:')")
        hidden = page.eval_on_selector_all("#labels-row, #prompt-row", "els => els.map(e => e.hidden)")
        page.fill("#prompt", "a lighthouse")
        page.fill("#steps", "2")
        page.click("#submit")
        page.wait_for_selector("#images img", timeout=120_000)
        shown = page.eval_on_selector_all("#images img", "els => els.map(e => [e.naturalWidth, e.naturalHeight])")
        report = page.text_content("#report")
        error = page.text_content("#error")
    assert hidden == [True, False]
    assert shown == [[manifest.image_size] * 2], (shown, error)
    assert "a lighthouse" in report and not error


# --- hostile clients (issue 22): a bad request never hurts another ----------------------------------------------
DEEP = "[" * 100_000 + "]" * 100_000
POISON = {  # each class the CLI refuses, as a raw body; every one must be its own 400, never reach a batch
    "seed -1": json.dumps({"prompt": "a", "seed": -1}),
    "seed of 5,000 digits": '{"prompt": "a", "seed": ' + "7" * 5000 + "}",
    "lone surrogate": json.dumps({"prompt": "a \udcff b"}),
    "cfg NaN": '{"prompt": "a", "cfg_scale": NaN}',
    "cfg Infinity": '{"prompt": "a", "cfg_scale": Infinity}',
    "cfg 1e308": '{"prompt": "a", "cfg_scale": 1e308}',
    "fractions NaN": '{"prompt": "a", "fractions": [NaN, 1.0]}',
    "eta NaN": '{"prompt": "a", "sampler": "ddim", "eta": NaN}',
    "eta negative": '{"prompt": "a", "sampler": "ddim", "eta": -1.0}',
    "eta with pndm": '{"prompt": "a", "sampler": "pndm", "eta": 0.5}',
    "steps 1000 pndm": '{"prompt": "a", "sampler": "pndm", "steps": 1000}',
    "dpm-solver++ 999": '{"prompt": "a", "sampler": "dpm-solver++", "steps": 999}',
    "nested body": DEEP,
    "nested field": '{"prompt": ' + DEEP + "}",
    "10 MB prompt": json.dumps({"prompt": "x" * (10 << 20)}),
    "1 MB field name": json.dumps({"y" * (1 << 20): 1, "prompt": "a"}),
}


def test_poison_requests_batched_with_good_ones_leave_the_good_ones_their_images(svc):
    good = [{"prompt": f"a good {i}", "steps": STEPS, "seed": i} for i in range(3)]
    bodies = [json.dumps(g).encode() for g in good] + [b.encode("utf-8", "surrogatepass") for b in POISON.values()]
    with ThreadPoolExecutor(8) as ex:  # all at once, inside one --batch-wait-ms window
        answers = list(ex.map(lambda b: svc.request("POST", "/v1/generate", b), bodies))
    for g, (status, _, raw) in zip(good, answers[:3], strict=True):
        body = json.loads(raw)
        assert status == 200, body
        assert png_of(body["images"][0]).shape[-1] == 3 and body["report"]["seed"] == g["seed"]
    assert max(json.loads(a[2])["report"]["batch_size"] for a in answers[:3]) > 1  # good ones did share a batch
    for name, (status, headers, raw) in zip(POISON, answers[3:], strict=True):
        assert status == 400 and headers["content-type"] == "application/json", (name, status, raw[:200])
        error = json.loads(raw)["error"]
        assert "\n" not in error and len(raw) < 600, (name, raw[:300])
    errors = {name: json.loads(a[2])["error"] for name, a in zip(POISON, answers[3:], strict=True)}
    assert "--seed must be an integer in [0, 2^64), got -1" in errors["seed -1"]
    assert "not valid UTF-8" in errors["lone surrogate"]
    assert "--eta applies to ddim only, not pndm" in errors["eta with pndm"]
    assert "give at most 999" in errors["steps 1000 pndm"]
    _assert_healthy(svc)


def _stalled(port: int, length: int = 100) -> socket.socket:
    """POST headers announcing `length` bytes of body, then nothing."""
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.sendall(f"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {length}\r\n\r\n".encode())
    return s


def _answer(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def test_stalled_clients_are_cut_and_never_block_a_normal_request(svc):
    stalled = [_stalled(svc.port) for _ in range(100)]
    idle = [socket.create_connection(("127.0.0.1", svc.port), timeout=60) for _ in range(20)]
    try:
        t0 = time.monotonic()
        status, _, body = svc.post({"prompt": "a normal request", "steps": STEPS})
        answered_s = time.monotonic() - t0
        assert status == 200, body
        assert answered_s < BODY_TIMEOUT_S, answered_s  # answered while all 100 are still stalled
        # each stalled client gets a JSON 408 after the body timeout, and its connection is closed
        for s in stalled[:5]:
            head, _, payload = _answer(s).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408"), head[:100]
            assert "did not arrive within" in json.loads(payload)["error"]
    finally:
        for s in stalled + idle:
            s.close()
    # a body declared over the limit is refused before it is sent
    s = _stalled(svc.port, 100 << 20)
    t0 = time.monotonic()
    head, _, payload = _answer(s).partition(b"\r\n\r\n")
    s.close()
    assert head.startswith(b"HTTP/1.1 413") and time.monotonic() - t0 < BODY_TIMEOUT_S, head[:100]
    assert "this service takes at most" in json.loads(payload)["error"]
    _assert_healthy(svc)
