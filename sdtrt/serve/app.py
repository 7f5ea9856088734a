"""The HTTP app: A1111 and OpenAI image APIs over one pipeline, with micro-batching, auth, limits and metrics.

``create_app(pipeline, spec)`` is the whole server; ``sdtrt serve`` runs it under uvicorn, ``sdtrt serve --ray``
under Ray Serve. Every generation request is validated at the edge (pydantic, then ``Pipeline.validate``), then
admitted to the batcher or refused (429 + Retry-After when the queue is full, 503 while draining). Bad input is a
4xx with a JSON error, never a 500; errors on ``/v1/...`` use OpenAI's error shape, the others A1111's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from sdtrt import __version__
from sdtrt.errors import SdtrtError, UsageError
from sdtrt.runtime import infotext
from sdtrt.runtime.request import MAX_STEPS, GenerateRequest
from sdtrt.serve import a1111, openai_images
from sdtrt.serve.batcher import Batcher, BatcherSpec
from sdtrt.serve.gate import Gate
from sdtrt.serve.http_errors import ClientGone, RequestTimeout, error_response
from sdtrt.serve.loras import LoraFolder
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
    max_steps: int = 150  # per request (A1111's UI limit); a request's cost is steps x images x pixels
    max_connections: int = 256  # open HTTP connections; uvicorn answers 503 beyond
    lora_dir: str | None = None  # LoRAs by file stem for <lora:NAME:SCALE> and OpenAI's "loras" (sdtrt.serve.loras)

    def __post_init__(self) -> None:
        for name, value, zero_ok in (("timeout", self.timeout_s, False), ("max body size (MB)", self.max_body_mb, False),
                                     ("batch window (ms)", self.batch_window_ms, True)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
                raise UsageError(f"{name} must be a finite {'non-negative' if zero_ok else 'positive'} number, got {value}")
        if not isinstance(self.max_steps, int) or not 1 <= self.max_steps <= MAX_STEPS:
            raise UsageError(f"max steps must be between 1 and {MAX_STEPS}, got {self.max_steps}")
        if not isinstance(self.max_connections, int) or self.max_connections < 1:
            raise UsageError(f"max connections must be at least 1, got {self.max_connections}")
        if self.api_key is not None and not self.api_key.strip():
            raise UsageError("the API key must not be empty")
        if self.lora_dir is not None and not str(self.lora_dir).strip():
            raise UsageError("the LoRA folder must not be empty")
        self.batcher_spec()  # its own checks

    def batcher_spec(self) -> BatcherSpec:
        return BatcherSpec(max_batch=self.max_batch, max_queue=self.max_queue, window_s=self.batch_window_ms / 1000)


def create_app(pipeline, spec: ServeSpec = ServeSpec(), *, metrics: Metrics | None = None) -> FastAPI:
    """The server over a loaded ``Pipeline``; its batcher thread starts now and drains on shutdown."""
    metrics = metrics or Metrics()
    loras = LoraFolder(spec.lora_dir)
    batcher = Batcher(pipeline.generate_batch, spec.batcher_spec(), metrics, capacity=pipeline.max_rows)
    model_name = pipeline.model_name
    facts = infotext.model_facts(pipeline.manifest, pipeline.backend.name)

    def a1111_infotext(req: GenerateRequest, batch_pos: int, batch_size: int, seed: int) -> str:
        hashes = ", ".join(f"{f.name}: {f.short_hash}" for f in pipeline.loras.files(req.loras)) if req.loras else None
        return infotext.build_infotext(req, facts, batch_pos=batch_pos, batch_size=batch_size, seed=seed,
                                       lora_hashes=hashes)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        # uvicorn has already finished the in-flight requests; anything still admitted is finished here too
        await run_in_threadpool(batcher.close)

    app = FastAPI(title="sdtrt", version=__version__, lifespan=lifespan,
                  description="Stable Diffusion on TensorRT: AUTOMATIC1111 and OpenAI image APIs.")
    app.state.batcher, app.state.metrics, app.state.pipeline, app.state.loras = batcher, metrics, pipeline, loras
    app.add_middleware(Gate, max_body=int(spec.max_body_mb * 2**20), metrics=metrics, api_key=spec.api_key)

    for exc in (SdtrtError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(exc, error_response)

    async def run(http: Request, requests) -> list:
        """Validate, admit, wait: the results in order, or the error to answer with. A request whose client went
        away is withdrawn: its jobs that have not started are skipped."""
        for r in requests:
            if r.steps > spec.max_steps:
                raise UsageError(f"steps {r.steps} is over this server's limit of {spec.max_steps} (--max-steps)")
        validated = await run_in_threadpool(lambda: [pipeline.validate(r) for r in requests])  # img2img resizes
        futures = batcher.submit(validated)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + spec.timeout_s
        done = asyncio.ensure_future(asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
        gone = asyncio.ensure_future(http.receive())  # the body is read: the next message is the disconnect
        try:
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    raise RequestTimeout(f"the request did not finish within {spec.timeout_s:g} s")
                await asyncio.wait({done, gone}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                if done.done():
                    return done.result()
                if gone.done():
                    if gone.result().get("type") == "http.disconnect":
                        raise ClientGone("the client disconnected before its images were ready")
                    gone = loop.create_future()  # this server does not signal disconnects so: stop watching
        finally:
            gone.cancel()
            done.cancel()
            for f in futures:
                f.cancel()  # on any failure: the request's jobs that have not started are skipped

    # -- health and metrics (no key: load balancers and scrapers) ---------------------------------------------------
    @app.get("/health", tags=["server"])
    async def health() -> JSONResponse:
        ok = batcher.alive
        body = {"status": "ok" if ok else "unavailable", "model": model_name, "backend": pipeline.backend.name,
                "queue_depth": batcher.depth, "max_queue": spec.max_queue, "max_batch": spec.max_batch,
                "version": __version__}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["server"])
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- A1111 ---------------------------------------------------------------------------------------------------
    @app.post("/sdapi/v1/txt2img", tags=["a1111"], response_model=a1111.A1111Response)
    async def txt2img(body: a1111.Txt2ImgRequest, http: Request):
        results = await run(http, a1111.to_requests(body, model_name, loras))
        return await run_in_threadpool(a1111.to_response, body, results, model_name, a1111_infotext)

    @app.post("/sdapi/v1/img2img", tags=["a1111"], response_model=a1111.A1111Response)
    async def img2img(body: a1111.Img2ImgRequest, http: Request):
        requests = await run_in_threadpool(a1111.to_requests, body, model_name, loras)  # decodes the image
        body.init_images = []  # decoded: do not hold the base64 text while queued (the answer never echoes it)
        results = await run(http, requests)
        return await run_in_threadpool(a1111.to_response, body, results, model_name, a1111_infotext)

    @app.get("/sdapi/v1/samplers", tags=["a1111"])
    def samplers() -> list[dict]:
        return a1111.sampler_names()

    @app.get("/sdapi/v1/schedulers", tags=["a1111"])
    def schedule_types() -> list[dict]:
        return a1111.schedule_types()

    @app.get("/sdapi/v1/sd-models", tags=["a1111"])
    def sd_models() -> list[dict]:
        sha256 = pipeline.manifest["source"].get("sha256")
        return [{"title": model_name, "model_name": model_name, "hash": facts.short_hash, "sha256": sha256,
                 "filename": str(pipeline.workdir), "config": None}]

    @app.get("/sdapi/v1/options", tags=["a1111"])
    def options() -> dict:
        return {"sd_model_checkpoint": model_name, "CLIP_stop_at_last_layers": 1}

    @app.get("/sdapi/v1/scripts", tags=["a1111"])
    def scripts() -> dict:
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/loras", tags=["a1111"])
    def lora_list() -> list[dict]:
        return loras.listing()

    @app.post("/sdapi/v1/refresh-loras", tags=["a1111"])
    def refresh_loras() -> None:  # A1111 answers null
        loras.refresh()

    @app.get("/sdapi/v1/progress", tags=["a1111"])
    def progress() -> dict:  # no per-step progress yet: clients polling it see the queue
        return {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None,
                "state": {"job_count": batcher.depth, "interrupted": False, "skipped": False}}

    # -- OpenAI ----------------------------------------------------------------------------------------------------
    @app.post("/v1/images/generations", tags=["openai"],
              response_model=openai_images.ImagesResponse)
    async def images_generations(body: openai_images.ImageGenerationRequest, http: Request):
        (result,) = await run(http, [openai_images.to_request(body, loras)])
        return await run_in_threadpool(openai_images.to_response, result)

    @app.get("/v1/models", tags=["openai"])
    def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "sdtrt"}]}

    return app
