"""The Ray Serve application: an HTTP ingress (FastAPI) in front of the Generator replicas.

    client -> Ray's HTTP proxy -> Ingress (parse, 400 / 503 / 504, metrics, web page)
                               -> Generator x N (validate, dynamic batching, one engine batch at a time)

Back-pressure is Ray Serve's: each Generator holds at most max_ongoing_requests, the ingress's handle
queues at most --max-queued more and raises BackPressureError beyond that (answered 503 + Retry-After).
"""

import asyncio
import base64
import io
import math
import os
import sys
import threading
import time
from dataclasses import replace
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from tstitch_trt.bundle.manifest import read_manifest
from tstitch_trt.demo import DEMO_NAME, resolve_bundle
from tstitch_trt.errors import UserError, first_line
from tstitch_trt.serve.batcher import Batcher
from tstitch_trt.serve.config import ServeConfig
from tstitch_trt.serve.metrics import ServiceMetrics
from tstitch_trt.serve.policy import AdaptiveRatio
from tstitch_trt.serve.requests import (
    CONTROL_FIELDS,
    KINDS,
    MAX_CONTROL_IMAGE_BYTES,
    GenerateRequest,
    RequestResult,
    parse_generate,
    pipeline_kind,
    run_isolated,
)

APP_NAME = "tstitch"
MIN_INGRESS_LIMIT = 1024
REPLICA_DIED = (RayActorError, ActorDiedError, ActorUnavailableError, DeploymentUnavailableError)


@serve.deployment(health_check_period_s=2.0, graceful_shutdown_timeout_s=5.0)
class Generator:
    """One replica: the bundle's pipeline on its best backend; batches compatible requests."""

    def __init__(self, cfg: ServeConfig):
        bundle = resolve_bundle(cfg.bundle)
        self.kind = KINDS[pipeline_kind(read_manifest(bundle))]
        self.pipe = self.kind.open(bundle, cfg.backend, cfg.precision)
        self.policy = AdaptiveRatio(cfg.latency_target_ms, cfg.max_ratio) if cfg.adaptive else None
        self.batcher = Batcher(self._run_batch, key=lambda r: r.batch_key, size=lambda r: r.num_images,
                               max_images=min(cfg.max_batch_size, self.kind.max_batch(self.pipe)),
                               wait_s=cfg.batch_wait_ms / 1e3, prepare=self._with_policy_ratio)

    def describe(self) -> dict:
        return {"pid": os.getpid(), "backend": self.pipe.backend.name, "backend_reason": self.pipe.backend_reason,
                "precisions": getattr(self.pipe, "precisions", None),
                "torch_imported": "torch" in sys.modules, "queued": self.batcher.queued,
                "ratio": None if self.policy is None else self.policy.ratio}

    async def generate(self, req: GenerateRequest) -> dict:
        req = replace(req, arrival=time.monotonic())
        try:
            # an adaptive request is checked at the policy's ratio now and runs at the ratio of its batch
            self.kind.validate(self.pipe, self._with_policy_ratio(req))
        except UserError as e:
            return {"status": 400, "error": str(e)}
        try:
            out = await self.batcher.submit(req)
        except Exception as e:  # noqa: BLE001 - answered as 500 with one line, never dropped
            msg = first_line(e)
            return {"status": 500, "error": f"generation failed: {msg}"}
        if self.policy is not None and req.adaptive and out["status"] == 200:
            rep = out["report"]
            self.policy.observe(rep["queue_ms"] + rep["compute_ms"])
        return out

    def _with_policy_ratio(self, req: GenerateRequest) -> GenerateRequest:
        if not req.adaptive:
            return req
        assert self.policy is not None, "adaptive requests reach only replicas with a policy"
        return replace(req, ratio=self.policy.ratio, fractions=None)

    async def _run_batch(self, reqs: list[GenerateRequest], abandoned: threading.Event) -> list[dict]:
        """One engine batch, in a thread, so the replica keeps answering health checks and queuing; it stops
        between steps once all its callers gave up (504 at the ingress, or a disconnect)."""
        start = time.monotonic()
        results = await asyncio.to_thread(run_isolated, self.kind, self.pipe, reqs, abandoned)
        encoded = await asyncio.to_thread(lambda: [_encode(r) for r in results])
        compute_ms = (time.monotonic() - start) * 1e3
        for r, body in zip(reqs, encoded, strict=True):
            if "error" in body:
                continue
            body["report"].update(queue_ms=round((start - r.arrival) * 1e3, 3), compute_ms=round(compute_ms, 3))
            body["status"] = 200
        return encoded


def _encode(result: RequestResult | Exception) -> dict:
    """A request's answer body: its images and report, or (its own failure) a status and one line."""
    if isinstance(result, UserError):
        return {"status": 400, "error": first_line(result)}
    if isinstance(result, Exception):
        return {"status": 500, "error": f"generation failed: {first_line(result)[:300]}"}
    from PIL import Image

    images = []
    for img in result.images:
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="PNG")
        images.append(base64.b64encode(buf.getvalue()).decode())
    body: dict = {"images": images, "report": dict(result.report)}
    if result.latents is not None:
        import numpy as np

        buf = io.BytesIO()
        np.save(buf, result.latents, allow_pickle=False)
        body["latents"] = base64.b64encode(buf.getvalue()).decode()
    return body


def _running_replicas() -> int | None:
    try:
        app_status = serve.status().applications[APP_NAME]
        return sum(d.replica_states.get("RUNNING", 0) for name, d in app_status.deployments.items()
                   if name == "Generator")
    except Exception:  # noqa: BLE001 - the controller is busy or gone: health says unknown
        return None


app = FastAPI(title="tstitch-trt", docs_url=None, redoc_url=None)


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# a request is JSON fields plus at most one base64 control image: anything larger is refused unread
MAX_BODY_BYTES = MAX_CONTROL_IMAGE_BYTES * 4 // 3 + (1 << 20)


class BodyRefused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refused by its declared Content-Length before any of it is read, cut off as soon as it
    passes `limit`, and given `timeout_s` to arrive whole: a client that stalls (headers, then nothing) holds
    this ingress's request slot for that long only."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit() or len(declared) > 18:
            raise BodyRefused(400, f"Content-Length {declared[:20]!r} is not a byte count")
        if int(declared) > limit:
            raise BodyRefused(413, f"the request body is {int(declared)} bytes; this service takes at most {limit} "
                                   "(one control image of 32 MB, base64)")
    chunks: list[bytes] = []
    size = 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyRefused(413, f"the request body is over {limit} bytes; this service takes at most {limit}")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout=timeout_s)
    except TimeoutError:
        raise BodyRefused(408, f"the request body did not arrive within {timeout_s:g} s (--body-timeout-s); "
                               "send it whole") from None
    return b"".join(chunks)


@serve.deployment(ray_actor_options={"num_cpus": 0}, graceful_shutdown_timeout_s=5.0)
@serve.ingress(app)
class Ingress:
    # serve.ingress pickles these routes when the class is defined: every helper they use is defined above
    def __init__(self, generator: DeploymentHandle, cfg: ServeConfig):
        self.gen = generator
        self.cfg = cfg
        self.manifest = read_manifest(resolve_bundle(cfg.bundle))
        self.is_demo = cfg.bundle == DEMO_NAME
        self.metrics = ServiceMetrics()
        self.recent_compute_s = 1.0  # for Retry-After: about one batch's time

    @app.get("/", response_class=HTMLResponse)
    def page(self) -> str:
        return resources.files("tstitch_trt.serve").joinpath("page.html").read_text()

    @app.get("/v1/info")
    def info(self) -> dict:
        m = self.manifest
        return {"pipeline": m.pipeline, "models": [x.name for x in m.models], "num_classes": m.num_classes,
                "image_size": m.image_size, "max_batch_size": self.cfg.max_batch_size,
                "adaptive": self.cfg.adaptive, "max_ratio": self.cfg.max_ratio,
                "fields": list(KINDS[m.pipeline].fields) + (list(CONTROL_FIELDS) if m.controlnet else []),
                "defaults": dict(zip(("sampler", "cfg_scale", "steps"), KINDS[m.pipeline].defaults(m, None),
                                     strict=True))}

    @app.get("/health")
    async def health(self) -> JSONResponse:
        running = await asyncio.to_thread(_running_replicas)  # a blocking call to Serve's controller
        try:
            replica = await asyncio.wait_for(self.gen.describe.remote(), timeout=10.0)
        except Exception as e:  # noqa: BLE001 - not ready (starting, restarting): 503, say why
            return _error(503, f"no replica is ready ({type(e).__name__})", {"Retry-After": "1"})
        return JSONResponse({"status": "ok", "replicas_running": running, "replicas": self.cfg.replicas,
                             "pipeline": self.manifest.pipeline, **replica})

    @app.get("/metrics")
    def metrics(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/generate")
    async def generate(self, request: Request) -> JSONResponse:
        t0 = time.monotonic()
        try:
            body = await _read_body(request, MAX_BODY_BYTES, self.cfg.body_timeout_s)
            response, report = await self._generate(body)
        except BodyRefused as e:  # the connection is closed: the rest of the body is never read
            response, report = _error(e.status, str(e), {"Connection": "close"}), None
        except Exception as e:  # noqa: BLE001 - a bug, but still one JSON line, never a plain-text 500
            response, report = _error(500, f"internal error ({type(e).__name__}: {first_line(e)[:200]})"), None
        self.metrics.answered(response.status_code, time.monotonic() - t0, report)
        return response

    async def _generate(self, body: bytes) -> tuple[JSONResponse, dict | None]:
        try:
            req = parse_generate(body, self.manifest, self.is_demo, self.cfg.max_batch_size, self.cfg.adaptive)
        except UserError as e:
            return _error(400, str(e)), None
        call = self.gen.generate.remote(req)
        retry = {"Retry-After": str(max(1, math.ceil(self.recent_compute_s)))}
        try:
            out = await asyncio.wait_for(call, timeout=self.cfg.request_timeout_s)
        except BackPressureError:
            return _error(503, f"the service is at capacity ({self.cfg.max_queued} requests queued); retry later",
                          retry), None
        except TimeoutError:
            call.cancel()
            return _error(504, f"the request took longer than {self.cfg.request_timeout_s:g} s "
                               "(--request-timeout-s); try fewer steps or images"), None
        except REPLICA_DIED as e:
            return _error(503, f"the replica running this request stopped ({type(e).__name__}); retry", retry), None
        status = out.pop("status")
        if status != 200:
            return _error(status, out["error"]), None
        self.recent_compute_s = out["report"]["compute_ms"] / 1e3
        return JSONResponse(out), out["report"]


def build_app(cfg: ServeConfig):  # -> ray.serve.Application
    """The bound application: Ingress(Generator x cfg.replicas)."""
    env = {"TSTITCH_ORT_THREADS": str(max(1, int(cfg.cpus_per_replica)))}
    gen = Generator.options(
        num_replicas=cfg.replicas,
        # a full batch of one-image requests running plus one more forming
        max_ongoing_requests=2 * cfg.max_batch_size,
        max_queued_requests=cfg.max_queued,
        ray_actor_options={"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica,
                           "runtime_env": {"env_vars": env}},
    ).bind(cfg)
    # the ingress only awaits: its own limit stays above everything the generators can hold, and far above what
    # stalled clients can hold at once (each for --body-timeout-s at most), so they never block the others
    ingress_limit = max(4 * (cfg.replicas * 2 * cfg.max_batch_size + cfg.max_queued) + 16, MIN_INGRESS_LIMIT)
    return Ingress.options(max_ongoing_requests=ingress_limit).bind(gen, cfg)
