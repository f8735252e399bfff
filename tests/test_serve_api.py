"""`tstitch-trt serve` on loopback, demo pair, torch blocked in every process: the HTTP API, bad input,
batching invariance (a batched request equals a single `tstitch-trt run`), /metrics and the web page.

One service for the whole module (Ray's start costs ~20 s here); stopping it must leave no process.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serve_harness import browser_page, latents_of, png_of, start_service

pytestmark = pytest.mark.serve
STEPS = 6


@pytest.fixture(scope="module")
def svc():
    # a long batch wait so that concurrent requests reliably share a batch; ORT, as the single runs the
    # batching-invariance test compares with (OpenVINO compiles per static batch, see ARCHITECTURE.md)
    s = start_service(["--bundle", "demo", "--backend", "ort", "--max-batch-size", "16", "--batch-wait-ms", "300"],
                      replicas=1)
    yield s
    left = s.stop()
    assert not left, f"processes survived the service's SIGTERM: {left}"


def _assert_healthy(svc) -> None:
    status, body = svc.get_json("/health")
    assert status == 200 and body["status"] == "ok", body


def test_health_names_the_torch_free_backend(svc):
    status, body = svc.get_json("/health")
    assert status == 200
    assert body["backend"] == "ort" and body["pipeline"] == "dit-class-conditional"
    assert body["replicas_running"] == 1
    # the replica ran with the torch block installed, and never imported torch
    blocked = {int(v) for v in svc.blocker_log.read_text().split()}
    assert body["pid"] in blocked
    assert body["torch_imported"] is False


def test_generate_answers_images_and_the_run_report(svc):
    status, _, body = svc.post({"class_labels": [3, 7], "steps": STEPS, "seed": 5})
    assert status == 200, body
    assert set(body) == {"images", "report"}
    imgs = [png_of(b) for b in body["images"]]
    assert [im.shape for im in imgs] == [(32, 32)] * 2 and imgs[0].dtype == np.uint8
    rep = body["report"]
    assert rep["class_labels"] == [3, 7] and rep["seed"] == 5 and rep["batch"] == 2
    assert rep["steps"] == STEPS and rep["sampler"] == "ddim" and rep["cfg_scale"] == 1.5  # run's defaults
    assert rep["ratio"] == 0.4 and sum(rep["steps_per_model"]) == STEPS and rep["steps_per_model"][0] > 0
    assert rep["batch_size"] >= 2 and rep["queue_ms"] >= 0 and rep["compute_ms"] > 0
    assert rep["backend"] == "ort"


@pytest.mark.parametrize("body, expect", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    ({"class_labels": [1], "colour": "red"}, "unknown field 'colour'"),
    ({"class_labels": [1], "ratio": 1.5}, "--ratio must be in [0, 1]"),
    ({"class_labels": [1] * 10000}, "10000 class labels"),
    ({"prompt": "a cat"}, "'prompt' does not apply to this dit-class-conditional bundle"),
    ({"class_labels": [12]}, "class label 12 is outside [0, 10)"),
    ({"class_labels": [1], "steps": 0}, "--steps must be an integer between 1 and 1000"),
    ({"class_labels": [1], "sampler": "euler"}, "unknown sampler 'euler'"),
    ({"class_labels": [1], "steps": "many"}, "steps must be an integer"),
    ({"class_labels": [1], "height": 64}, "height 64 is not this bundle's image size"),
    ({"class_labels": [1], "fractions": [0.5, 0.6]}, "fractions must sum to 1"),
])
def test_bad_input_is_a_400_with_one_line_and_the_service_stays_healthy(svc, body, expect):
    status, _, out = svc.post(body)
    assert status == 400, out
    assert expect in out["error"] and "\n" not in out["error"], out
    _assert_healthy(svc)


def test_messages_are_the_cli_messages(svc, tmp_path):
    """The same check answers the CLI and the service: the ratio message is run's, word for word."""
    r = subprocess.run([sys.executable, "-m", "tstitch_trt.cli", "run", "--backend", "ort", "--steps", "2",
                        "--ratio", "1.5", "--out", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert r.returncode == 2
    _, _, out = svc.post({"ratio": 1.5, "class_labels": [1]})
    # argparse refuses it in the CLI, the pipeline's validate in the service: one wording for both
    core = "must be in [0, 1] (the share of early steps on the small model), got 1.5"
    assert core in r.stderr and core in out["error"] and "--ratio" in out["error"]


def test_batched_requests_equal_single_runs(svc, tmp_path):
    """Concurrent requests share engine batches; each one's latents equal a lone run with its seed."""
    from tstitch_trt.demo import demo_bundle_dir
    from tstitch_trt.pipeline.dit import StitchedPipeline

    reqs = [{"class_labels": [1, 2], "seed": 11}, {"class_labels": [3], "seed": 12},
            {"class_labels": [4, 5, 6], "seed": 13}, {"class_labels": [7], "seed": 14},
            # ddpm draws per-step noise: per request too
            {"class_labels": [8], "seed": 21, "sampler": "ddpm"},
            {"class_labels": [9, 0], "seed": 22, "sampler": "ddpm"},
            {"class_labels": [2], "seed": 23, "sampler": "ddpm"}]
    for r in reqs:
        r.update(steps=STEPS, return_latents=True)
    with ThreadPoolExecutor(len(reqs)) as ex:
        answers = list(ex.map(svc.post, reqs))
    assert all(a[0] == 200 for a in answers), [a[2] for a in answers if a[0] != 200]
    reports = [a[2]["report"] for a in answers]
    # batching really happened, and only among compatible requests (ddim with ddim, ddpm with ddpm)
    assert max(r["batch_size"] - r["batch"] for r in reports) > 0, [r["batch_size"] for r in reports]
    assert all(r["batch_size"] <= (7 if r["sampler"] == "ddim" else 4) for r in reports)

    pipe = StitchedPipeline.from_bundle(demo_bundle_dir(), backend="ort")
    try:
        for req, (_, _, body) in zip(reqs, answers, strict=True):
            alone = pipe(class_labels=req["class_labels"], steps=STEPS, seed=req["seed"], ratio=0.4,
                         sampler=req.get("sampler", "ddim"), progress=False).latents
            got = latents_of(body)
            np.testing.assert_allclose(got, alone, rtol=1e-5, atol=1e-5 * np.abs(alone).max())
    finally:
        pipe.close()

    # and literally `tstitch-trt run` for one of them
    npy = tmp_path / "run.npy"
    subprocess.run([sys.executable, "-m", "tstitch_trt.cli", "run", "--backend", "ort", "--steps", str(STEPS),
                    "--class-labels", "4,5,6", "--seed", "13", "--save-latents", str(npy),
                    "--out", str(tmp_path / "run.png")], check=True, capture_output=True)
    run = np.load(npy)
    np.testing.assert_allclose(latents_of(answers[2][2]), run, rtol=1e-5, atol=1e-5 * np.abs(run).max())


def test_metrics_count_requests_batches_and_ratio(svc):
    svc.post({"class_labels": [1], "steps": STEPS})
    svc.post({"class_labels": [1], "ratio": 2})
    status, _, raw = svc.request("GET", "/metrics")
    assert status == 200
    text = raw.decode()
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines() if line and not line.startswith("#")}
    assert samples['tstitch_requests_total{status="200"}'] >= 1
    assert samples['tstitch_requests_total{status="400"}'] >= 1
    assert samples["tstitch_batch_size_count"] >= 1 and samples["tstitch_queue_seconds_count"] >= 1
    assert samples["tstitch_compute_seconds_count"] >= 1
    assert samples["tstitch_stitch_ratio_last"] == pytest.approx(0.4)
    assert samples['tstitch_stitch_ratio_bucket{le="0.4"}'] >= 1



def test_web_page_in_a_real_browser(svc, tmp_path):
    """Debian's chromium, headless, driven by Playwright: load the page, submit, see decoded images."""
    with browser_page(tmp_path / "profile") as page:
        page.goto(svc.url + "/", timeout=60_000)
        page.wait_for_function("document.getElementById('bundle').textContent.includes('DiT-Demo')")
        page.fill("#class_labels", "1,2,3")
        page.fill("#steps", str(STEPS))
        page.fill("#seed", "4")
        page.click("#submit")
        page.wait_for_selector("#images img", timeout=120_000)
        shown = page.eval_on_selector_all("#images img", "els => els.map(e => [e.naturalWidth, e.naturalHeight])")
        summary = page.text_content("#summary")
        error = page.text_content("#error")
    assert shown == [[32, 32]] * 3, (shown, error)
    assert f"{STEPS} ddim steps" in summary and "on DiT-Demo-S/4" in summary and "ms" in summary, summary
    assert not error


def test_page_and_info_describe_the_bundle(svc):
    status, _, raw = svc.request("GET", "/")
    assert status == 200 and b"<form" in raw
    status, info = svc.get_json("/v1/info")
    assert status == 200 and info["models"] == ["DiT-Demo-S/4", "DiT-Demo-L/4"] and info["fields"] == ["class_labels"]
