"""``sdtrt serve``: the app under uvicorn on one machine."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

from sdtrt.errors import SdtrtError, UsageError
from sdtrt.serve.app import ServeSpec, create_app
from sdtrt.serve.loras import check_lora_dir

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so a taken port fails in a second, not a minute."""
    if not 0 <= port <= 65535:
        raise UsageError(f"port must be between 0 and 65535, got {port}")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UsageError(f"cannot resolve host {host!r}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)  # connections queue from now on, while the model loads
    sock.set_inheritable(True)
    return sock


def warn_if_open(host: str, spec: ServeSpec) -> None:
    if host not in LOOPBACK and spec.api_key is None:
        log.warning("serving on %s without --api-key: anyone who can reach this port can use the GPU", host)


def run_server(workdir: str | Path, spec: ServeSpec, *, host: str = "127.0.0.1", port: int = 7860,
               backend: str = "auto", announce=None, debug: bool = False) -> None:
    """Serve until SIGINT/SIGTERM; then finish every admitted request and exit."""
    import uvicorn

    from sdtrt.runtime.pipeline import Pipeline

    warn_if_open(host, spec)
    check_lora_dir(spec.lora_dir)  # before the model loads
    sock = bind(host, port)
    pipeline = Pipeline.load(workdir, backend=backend)
    app = create_app(pipeline, spec)
    bound_port = sock.getsockname()[1]
    (announce or log.info)(f"serving {workdir} ({pipeline.backend.name}) on http://{host}:{bound_port}: A1111 API /sdapi/v1, "
             f"OpenAI API /v1/images/generations, docs /docs, metrics /metrics")
    config = uvicorn.Config(app, log_level="info" if debug else "warning", timeout_graceful_shutdown=None,
                            access_log=debug, limit_concurrency=spec.max_connections)
    uvicorn.Server(config).run(sockets=[sock])


class ThreadedServer:
    """The app under uvicorn in a background thread on a free loopback port (tests, benchmarks):
    ``with ThreadedServer(app) as s: requests.get(s.url + "/health")``."""

    def __init__(self, app, host: str = "127.0.0.1") -> None:
        import threading
        import time

        import uvicorn

        sock = bind(host, 0)
        self.port = sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=None))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise SdtrtError("the server thread did not start")
            time.sleep(0.01)

    def close(self) -> None:
        """Graceful: admitted requests finish first."""
        self.server.should_exit = True
        self.thread.join(60)

    def __enter__(self) -> ThreadedServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
