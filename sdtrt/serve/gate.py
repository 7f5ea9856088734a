"""The ASGI gate in front of the app: API key, body size limit, and per-API request metrics.

The key is checked before the body is read, so an unauthenticated client costs no buffering or parsing; the body
is then read up to the limit (413 past it, declared or counted) and replayed to the app.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import secrets
import time

from fastapi import Request

from sdtrt.serve.http_errors import BodyTooLarge, Unauthorized, error_response
from sdtrt.serve.metrics import Metrics

OPEN_PATHS = frozenset({"/health", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
APIS = {"/sdapi/v1/txt2img": "a1111", "/sdapi/v1/img2img": "a1111", "/v1/images/generations": "openai"}


def key_matches(authorization: str, api_key: str) -> bool:
    """``Bearer KEY``, or HTTP basic auth with KEY as the password (A1111 clients speak basic auth)."""
    scheme, _, value = authorization.partition(" ")
    given = ""
    if scheme.lower() == "bearer":
        given = value.strip()
    elif scheme.lower() == "basic":
        with contextlib.suppress(binascii.Error, UnicodeError, ValueError):
            given = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
    return secrets.compare_digest(given.encode(), api_key.encode())


class Gate:
    def __init__(self, app, max_body: int, metrics: Metrics, api_key: str | None) -> None:
        self.app, self.max_body, self.metrics, self.api_key = app, max_body, metrics, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        api = APIS.get(scope["path"])
        t0 = time.perf_counter()
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            if not key_matches(auth, self.api_key):
                err = Unauthorized("missing or wrong API key (send 'Authorization: Bearer KEY')")
                return await self._refuse(scope, receive, send, api, err, t0)
        declared = headers.get(b"content-length")
        too_large = BodyTooLarge(f"the request body is over the limit of {self.max_body} bytes")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            return await self._refuse(scope, receive, send, api, too_large, t0)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body:
                return await self._refuse(scope, receive, send, api, too_large, t0)
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

        try:
            await self.app(scope, replay_receive, watched_send)
        finally:
            self._count(api, status, t0)

    async def _refuse(self, scope, receive, send, api, error, t0) -> None:
        response = error_response(Request(scope, receive), error)
        await response(scope, receive, send)
        self._count(api, response.status_code, t0)

    def _count(self, api: str | None, status: int, t0: float) -> None:
        if api is not None:
            self.metrics.requests.labels(api=api, code=str(status)).inc()
            self.metrics.request_seconds.labels(api=api, code=str(status)).observe(time.perf_counter() - t0)
