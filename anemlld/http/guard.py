"""Who may talk to the HTTP APIs: local-only by default.

- ``Host`` must name this machine by loopback (``localhost``, ``127.0.0.1``,
  ``[::1]``) or the bound address, else 403: a web page whose domain an
  attacker re-points at 127.0.0.1 (DNS rebinding) sends its own domain there.
  Bound to a non-loopback address (which needs an API key), any Host is let in.
- A request with an ``Origin`` that is not a localhost origin or one of
  ``[http] cors_origins`` gets 403, so a foreign page cannot even start a
  generation with a "simple" request that CORS would let through unread.
  Allowed origins get CORS headers from Starlette's ``CORSMiddleware``.
- With ``[http] api_key_file`` set, every endpoint but ``/health`` (and CORS
  preflights, which browsers send without credentials) needs
  ``Authorization: Bearer <key>``.

Errors are in the dialect of the path: ``{"error": "..."}`` under ``/api``
(Ollama), ``{"error": {"message", "type", "param", "code"}}`` elsewhere (OpenAI).
"""
from __future__ import annotations

import hmac
import json
import re
from typing import Any

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from shared.settings import HttpSettings

LOCAL_ORIGIN = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")
OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 408: "timeout_error", 413: "invalid_request_error",
                500: "server_error", 503: "unavailable_error"}


def error_body(path: str, status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    if path.startswith("/api"):
        return json.dumps({"error": message}).encode()
    return json.dumps({"error": {"message": message, "type": OPENAI_TYPES.get(status, "server_error"),
                                 "param": param, "code": code}}).encode()


async def send_error(scope: Scope, send: Send, status: int, message: str, code: str,
                     headers: dict[str, str] | None = None) -> None:
    body = error_body(scope.get("path", ""), status, message, code=code)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class LocalOnly:
    """Host and Origin checks (outermost)."""

    def __init__(self, app: ASGIApp, http: HttpSettings):
        self.app = app
        self.any_host = not http.loopback
        self.hosts = set(LOCAL_HOSTS) | {http.host, f"[{http.host}]"}
        self.origins = set(http.cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        host = _host_name(headers.get("host", ""))
        if not self.any_host and host not in self.hosts:
            return await send_error(scope, send, 403, f"Host {headers.get('host', '')!r} is not this machine: "
                                    "this server answers only requests addressed to localhost, 127.0.0.1 "
                                    "or [::1] (a guard against DNS rebinding)",
                                    "forbidden_host")
        origin = headers.get("origin")
        if origin is not None and not self.allowed_origin(origin):
            return await send_error(scope, send, 403, f"Origin {origin!r} is not allowed: add it to [http] "
                                    "cors_origins in the daemon's settings.toml to let that page in",
                                    "forbidden_origin")
        await self.app(scope, receive, send)

    def allowed_origin(self, origin: str) -> bool:
        return origin in self.origins or re.fullmatch(LOCAL_ORIGIN, origin) is not None


class ApiKey:
    """Bearer-key check (inside CORS, so preflights pass)."""

    def __init__(self, app: ASGIApp, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") == "/health":
            return await self.app(scope, receive, send)
        given = Headers(scope=scope).get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key):
            what = "is missing" if not given else "is wrong"
            return await send_error(scope, send, 401, f"the API key {what}: send 'Authorization: Bearer <key>' "
                                    "with the key in the daemon's [http] api_key_file", "invalid_api_key",
                                    {"WWW-Authenticate": "Bearer"})
        await self.app(scope, receive, send)


def wrap(app: ASGIApp, http: HttpSettings) -> ASGIApp:
    """The app behind every guard, outermost first: LocalOnly, CORS, ApiKey."""
    inner: Any = ApiKey(app, http.api_key) if http.api_key else app
    cors = CORSMiddleware(inner, allow_origins=list(http.cors_origins), allow_origin_regex=LOCAL_ORIGIN,
                          allow_methods=["GET", "POST", "HEAD", "OPTIONS", "DELETE"], allow_headers=["*"],
                          max_age=600)
    return LocalOnly(cors, http)


def _host_name(host: str) -> str:
    """The Host header without its port (IPv6 literals keep their brackets)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[:host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
