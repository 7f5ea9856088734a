"""Errors as HTTP answers: one JSON error per failure, OpenAI's shape under ``/v1``, A1111's elsewhere.

Bad input (pydantic, ``UsageError``, ``ShapeError``) is 422 (400 under ``/v1``, as OpenAI answers), a full queue
429 with Retry-After, draining 503, a timeout 504; a generation failure is a 500 naming its cause; anything else
is a 500 "internal server error", logged with its traceback.
"""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from sdtrt.errors import SdtrtError, ShapeError, UsageError
from sdtrt.serve.batcher import QueueFull, ShuttingDown

log = logging.getLogger(__name__)


class RequestTimeout(SdtrtError):
    """The request did not finish within the server's timeout (504)."""


class ClientGone(SdtrtError):
    """The client disconnected; its request is withdrawn (499, nginx's "client closed request", never seen)."""


class Unauthorized(SdtrtError):
    """Missing or wrong API key (401)."""


class BodyTooLarge(SdtrtError):
    """The request body is over the limit (413)."""


def _status(e: Exception) -> int:
    if isinstance(e, HTTPException):
        return e.status_code
    if isinstance(e, Unauthorized):
        return 401
    if isinstance(e, BodyTooLarge):
        return 413
    if isinstance(e, (UsageError, ShapeError, RequestValidationError)):
        return 422
    if isinstance(e, QueueFull):
        return 429
    if isinstance(e, ShuttingDown):
        return 503
    if isinstance(e, RequestTimeout):
        return 504
    if isinstance(e, ClientGone):
        return 499
    return 500


def _message(e: Exception) -> str:
    if isinstance(e, RequestValidationError):
        parts = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        return "; ".join(parts) or "invalid request"
    if isinstance(e, HTTPException):
        return str(e.detail)
    if isinstance(e, SdtrtError):
        return str(e)
    return "internal server error"


def error_response(request: Request, e: Exception) -> JSONResponse:
    """One JSON error: OpenAI's shape under /v1, A1111's elsewhere (``error`` kind + ``detail`` message)."""
    status, message = _status(e), _message(e)
    if status == 500 and not isinstance(e, (SdtrtError, HTTPException)):
        log.error("internal error on %s", request.url.path, exc_info=e)
    elif status == 500 and isinstance(e, SdtrtError):
        message = f"generation failed: {message}"
    headers = {}
    if isinstance(e, QueueFull):
        headers["Retry-After"] = str(e.retry_after)
    elif isinstance(e, ShuttingDown):
        headers["Retry-After"] = "5"
    elif isinstance(e, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    kind = ("RequestValidationError" if isinstance(e, RequestValidationError)
            else "HTTPError" if isinstance(e, HTTPException) else type(e).__name__)
    metrics = getattr(request.app.state, "metrics", None) if "app" in request.scope else None
    if metrics is not None:
        metrics.errors.labels(kind=kind).inc()
    if request.url.path.startswith("/v1/"):
        # OpenAI: 400 for invalid requests (its clients map status codes to exception classes)
        if status == 422:
            status = 400
        otype = ("rate_limit_error" if status == 429 else "invalid_request_error" if 400 <= status < 500
                 else "server_error")
        code = "invalid_api_key" if status == 401 else None
        body = {"error": {"message": message, "type": otype, "param": None, "code": code}}
    else:
        body = {"error": kind, "detail": message}
    return JSONResponse(body, status_code=status, headers=headers)
