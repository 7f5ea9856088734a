"""The HTTP app: A1111 and OpenAI image APIs over one pipeline, with micro-batching, auth, limits and metrics.

``create_app(pipeline, spec)`` is the whole server; ``sdtrt serve`` runs it under uvicorn, ``sdtrt serve --ray``
under Ray Serve. Every generation request is validated at the edge (pydantic, then ``Pipeline.validate``), then
admitted to the batcher or refused (429 + Retry-After when the queue is full, 503 while draining). Bad input is a
4xx with a JSON error, never a 500; errors on ``/v1/...`` use OpenAI's error shape, the others A1111's.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from sdtrt import __version__
from sdtrt.errors import SdtrtError, UsageError
from sdtrt.serve import a1111, openai_images
from sdtrt.serve.batcher import Batcher, BatcherSpec, QueueFull, ShuttingDown
from sdtrt.serve.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeSpec:
    max_batch: int = 4  # images per pipeline pass
    max_queue: int = 64  # requests waiting; more are refused with 429
    batch_window_ms: float = 10.0  # how long an idle worker waits to fill a batch
    timeout_s: float = 600.0  # per request, queue included; then 504
    api_key: str | None = None  # when set: "Authorization: Bearer KEY" (or HTTP basic auth with KEY as password)
    max_body_mb: float = 32.0

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise UsageError(f"timeout must be positive, got {self.timeout_s}")
        if self.max_body_mb <= 0:
            raise UsageError(f"max body size must be positive, got {self.max_body_mb}")
        if self.api_key is not None and not self.api_key.strip():
            raise UsageError("the API key must not be empty")

    def batcher_spec(self) -> BatcherSpec:
        return BatcherSpec(max_batch=self.max_batch, max_queue=self.max_queue, window_s=self.batch_window_ms / 1000)


class RequestTimeout(SdtrtError):
    """The request did not finish within the server's timeout (504)."""


class Unauthorized(SdtrtError):
    """Missing or wrong API key (401)."""


class BodyTooLarge(SdtrtError):
    """The request body is over the limit (413)."""


def _status(e: Exception) -> int:
    if isinstance(e, Unauthorized):
        return 401
    if isinstance(e, BodyTooLarge):
        return 413
    if isinstance(e, (UsageError, RequestValidationError)):
        return 422
    if isinstance(e, QueueFull):
        return 429
    if isinstance(e, ShuttingDown):
        return 503
    if isinstance(e, RequestTimeout):
        return 504
    return 500


def _message(e: Exception) -> str:
    if isinstance(e, RequestValidationError):
        parts = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        return "; ".join(parts) or "invalid request"
    if isinstance(e, SdtrtError):
        return str(e)
    return "internal server error"


def error_response(request: Request, e: Exception) -> JSONResponse:
    """One JSON error: OpenAI's shape under /v1, A1111's elsewhere (``error`` kind + ``detail`` message)."""
    status, message = _status(e), _message(e)
    if status == 500 and not isinstance(e, SdtrtError):
        log.error("internal error on %s", request.url.path, exc_info=e)
    elif status == 500:
        message = f"generation failed: {message}"
    headers = {}
    if isinstance(e, QueueFull):
        headers["Retry-After"] = str(e.retry_after)
    elif isinstance(e, ShuttingDown):
        headers["Retry-After"] = "5"
    elif isinstance(e, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    kind = "RequestValidationError" if isinstance(e, RequestValidationError) else type(e).__name__
    metrics = getattr(request.app.state, "metrics", None) if "app" in request.scope else None
    if metrics is not None:
        metrics.errors.labels(kind=kind).inc()
    if request.url.path.startswith("/v1/"):
        # OpenAI: 400 for invalid requests (its clients map status codes to exception classes)
        if status == 422:
            status = 400
        otype = {400: "invalid_request_error", 401: "invalid_request_error", 413: "invalid_request_error",
                 429: "rate_limit_error"}.get(status, "server_error")
        code = "invalid_api_key" if status == 401 else None
        body = {"error": {"message": message, "type": otype, "param": None, "code": code}}
    else:
        body = {"error": kind, "detail": message}
    return JSONResponse(body, status_code=status, headers=headers)


class _Limits:
    """ASGI middleware: refuse bodies over the limit (413, declared or counted) and count generation requests by API
    and status."""

    APIS = {"/sdapi/v1/txt2img": "a1111", "/sdapi/v1/img2img": "a1111", "/v1/images/generations": "openai"}

    def __init__(self, app, max_body: int, metrics: Metrics) -> None:
        self.app, self.max_body, self.metrics = app, max_body, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        api = self.APIS.get(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            return await self._too_large(scope, receive, send, api)
        # read the body here, up to the limit (FastAPI would buffer it anyway), then hand it on
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body:
                return await self._too_large(scope, receive, send, api)
        body = b"".join(chunks)
        replayed = False
        status = 500

        async def replay_receive():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def watched_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        t0 = time.perf_counter()
        try:
            await self.app(scope, replay_receive, watched_send)
        finally:
            if api is not None:
                self.metrics.requests.labels(api=api, code=str(status)).inc()
                self.metrics.request_seconds.labels(api=api).observe(time.perf_counter() - t0)

    async def _too_large(self, scope, receive, send, api):
        e = BodyTooLarge(f"the request body is over the limit of {self.max_body} bytes")
        response = error_response(Request(scope, receive), e)
        if api is not None:
            self.metrics.requests.labels(api=api, code="413").inc()
        await response(scope, receive, send)


def _check_key(api_key: str | None):
    def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        given = ""
        if scheme.lower() == "bearer":
            given = value.strip()
        elif scheme.lower() == "basic":  # A1111 clients speak basic auth (--api-auth): the key is the password
            with contextlib.suppress(binascii.Error, UnicodeDecodeError):
                given = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise Unauthorized("missing or wrong API key (send 'Authorization: Bearer KEY')")

    return check


def create_app(pipeline, spec: ServeSpec = ServeSpec(), *, metrics: Metrics | None = None) -> FastAPI:
    """The server over a loaded ``Pipeline``; its batcher thread starts now and drains on shutdown."""
    metrics = metrics or Metrics()
    batcher = Batcher(pipeline.generate_batch, spec.batcher_spec(), metrics)
    model_name = str(pipeline.manifest["source"].get("arch") or pipeline.workdir.name)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        # uvicorn has already finished the in-flight requests; anything still admitted is finished here too
        await run_in_threadpool(batcher.close)

    app = FastAPI(title="sdtrt", version=__version__, lifespan=lifespan,
                  description="Stable Diffusion on TensorRT: AUTOMATIC1111 and OpenAI image APIs.")
    app.state.batcher, app.state.metrics, app.state.pipeline = batcher, metrics, pipeline
    app.add_middleware(_Limits, max_body=int(spec.max_body_mb * 2**20), metrics=metrics)
    auth = [Depends(_check_key(spec.api_key))]

    for exc in (SdtrtError, RequestValidationError, Exception):
        app.add_exception_handler(exc, error_response)

    async def run(requests) -> list:
        """Validate, admit, wait: the results in order, or the error to answer with."""
        validated = [pipeline.validate(r) for r in requests]
        futures = batcher.submit(validated)
        waits = [asyncio.wrap_future(f) for f in futures]
        try:
            return await asyncio.wait_for(asyncio.gather(*waits), spec.timeout_s)
        except asyncio.TimeoutError:
            for f in futures:
                f.cancel()  # a job not started yet is skipped by the worker
            raise RequestTimeout(f"the request did not finish within {spec.timeout_s:g} s") from None

    # -- health and metrics (no key: load balancers and scrapers) ---------------------------------------------------
    @app.get("/health", tags=["server"])
    def health() -> JSONResponse:
        body = {"status": "draining" if batcher.closing else "ok", "model": model_name,
                "backend": pipeline.backend.name, "queue_depth": batcher.depth, "max_queue": spec.max_queue,
                "max_batch": spec.max_batch, "version": __version__}
        return JSONResponse(body, status_code=503 if batcher.closing else 200)

    @app.get("/metrics", tags=["server"])
    def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- A1111 ---------------------------------------------------------------------------------------------------
    @app.post("/sdapi/v1/txt2img", dependencies=auth, tags=["a1111"], response_model=a1111.A1111Response)
    async def txt2img(body: a1111.Txt2ImgRequest):
        results = await run(a1111.to_requests(body, model_name))
        return await run_in_threadpool(a1111.to_response, body, results, model_name)

    @app.post("/sdapi/v1/img2img", dependencies=auth, tags=["a1111"], response_model=a1111.A1111Response)
    async def img2img(body: a1111.Img2ImgRequest):
        requests = await run_in_threadpool(a1111.to_requests, body, model_name)  # decodes the image
        results = await run(requests)
        return await run_in_threadpool(a1111.to_response, body, results, model_name)

    @app.get("/sdapi/v1/samplers", dependencies=auth, tags=["a1111"])
    def samplers() -> list[dict]:
        return a1111.sampler_names()

    @app.get("/sdapi/v1/sd-models", dependencies=auth, tags=["a1111"])
    def sd_models() -> list[dict]:
        return [{"title": model_name, "model_name": model_name, "hash": None, "sha256": None,
                 "filename": str(pipeline.workdir), "config": None}]

    @app.get("/sdapi/v1/options", dependencies=auth, tags=["a1111"])
    def options() -> dict:
        return {"sd_model_checkpoint": model_name, "CLIP_stop_at_last_layers": 1}

    @app.get("/sdapi/v1/scripts", dependencies=auth, tags=["a1111"])
    def scripts() -> dict:
        return {"txt2img": [], "img2img": []}

    # -- OpenAI ----------------------------------------------------------------------------------------------------
    @app.post("/v1/images/generations", dependencies=auth, tags=["openai"],
              response_model=openai_images.ImagesResponse)
    async def images_generations(body: openai_images.ImageGenerationRequest):
        (result,) = await run([openai_images.to_request(body)])
        return await run_in_threadpool(openai_images.to_response, result)

    @app.get("/v1/models", dependencies=auth, tags=["openai"])
    def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "sdtrt"}]}

    return app
