"""The HTTP listener: the Starlette app with both dialects behind the guards,
served by uvicorn on its own thread (and asyncio loop) in the daemon process.

The socket is bound by ``bind`` before anything else starts, so a port in
use fails the daemon's start with a clear error, and port 0's free port is
known (``url``) before the first client asks ``hello``.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from anemlld.http import guard, ollama, openai
from shared.errors import AnemllError
from shared.settings import HttpSettings

log = logging.getLogger(__name__)

GRACEFUL_S = 2.0  # open streams get this long at shutdown before they are cut (their generations cancelled)


def build_app(service: Any, http: HttpSettings) -> Any:
    """The whole ASGI app (routes, JSON errors, guards); in-process tests call it too."""
    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "server": "anemlld", "version": service.version})

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        what = "no such endpoint" if status == 404 else f"{request.method} is not allowed here"
        message = f"{what}: {request.method} {request.url.path}; docs/http.md lists the endpoints"
        return Response(guard.error_body(request.url.path, status, message, code="not_found"), status,
                        media_type="application/json")

    routes = [Route("/health", health, methods=["GET"]),
              *openai.routes(service, http.max_body_bytes), *ollama.routes(service, http.max_body_bytes)]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
    return guard.wrap(app, http)


class HttpServer:
    def __init__(self, service: Any, http: HttpSettings):
        self.service, self.http = service, http
        self._sock: socket.socket | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.url: str | None = None

    def bind(self) -> str:
        """Listen on ``[http] bind``; the base URL actually bound."""
        family = socket.AF_INET6 if ":" in self.http.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.http.host, self.http.port))
            sock.listen(128)
        except OSError as e:
            sock.close()
            raise AnemllError(f"cannot listen for HTTP on {self.http.host}:{self.http.port}: {e.strerror}",
                              "another server (an anemlld of another home?) has that port: set [http] bind in "
                              "settings.toml to another port (\"127.0.0.1:0\" picks a free one), or "
                              "[http] enabled = false") from e
        sock.setblocking(False)
        self._sock = sock
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if family == socket.AF_INET6 else host
        self.url = f"http://{shown}:{port}"
        return self.url

    def start(self) -> None:
        import uvicorn

        if self._sock is None:
            self.bind()
        config = uvicorn.Config(build_app(self.service, self.http), log_config=None, access_log=False,
                                lifespan="off", timeout_keep_alive=5, timeout_graceful_shutdown=GRACEFUL_S)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)
        self._thread.start()
        log.info("serving HTTP on %s (OpenAI /v1, Ollama /api%s)", self.url,
                 ", API key required" if self.http.api_key else "")

    def _run(self) -> None:
        try:
            asyncio.run(self._server.serve(sockets=[self._sock]))
        except Exception:
            log.exception("the HTTP server stopped")

    def stop(self, timeout: float = GRACEFUL_S + 3.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the HTTP server did not stop within %.0f s", timeout)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
