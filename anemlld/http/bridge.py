"""What both HTTP dialects need between a request and the service: reading a
JSON body within its limits, the error record and its status code, checked
field access that names the field, and ``EventStream``, which carries a
generation's events from the model's worker thread into the event loop.

Tokens are not sent one event-loop wakeup each: the worker appends to a list
and wakes the loop only if it is not already woken and, for a token, only if
``stream_interval_seconds`` (settings, 20 ms) have passed since it last woke
it (the first token and every other event wake it at once); the loop takes
everything that arrived since it last looked. Each wakeup makes the loop
thread take the GIL from the model's worker: one per token cost the pico
demo model (about 300 tok/s) 20% of its decode speed over HTTP
(bench/serving.py), the same effect the socket's stream interval answers.
Models slower than 50 tok/s, most of them on the Neural Engine, still get one
chunk per token.
"""
from __future__ import annotations

import asyncio
import dataclasses
import difflib
import json
import logging
import math
import threading
import time
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request

from anemlld.service import Generation, NotReady
from shared import protocol as p
from shared.errors import AnemllError

log = logging.getLogger(__name__)

BODY_TIMEOUT_S = 30.0  # a client that takes longer to send its body gets 408 and never reaches a model
STALL_S = 30.0  # a stream whose client has not taken its tokens for this long is cancelled
STATUS = {"bad_request": 400, "bad_input": 400, "context_overflow": 400, "unknown_op": 400, "unauthorized": 401,
          "forbidden": 403, "not_found": 404, "timeout": 408, "too_large": 413, "busy": 503,
          "not_ready": 503, "model_failed": 500, "internal": 500}


class ApiError(Exception):
    """An HTTP error: status, message (with what to do next), the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.retry_after = status, message, param, code, retry_after

    @classmethod
    def of(cls, error: BaseException) -> "ApiError":
        if isinstance(error, ApiError):
            return error
        if isinstance(error, NotReady):
            return cls(503, _with_hint(error), code="model_not_ready", retry_after=error.retry_after)
        if isinstance(error, AnemllError):
            code = error.code
            status = STATUS.get(code, 500)
            if code == "busy":
                return cls(status, _with_hint(error), code=code, retry_after=1.0)
            if code == "not_found":
                code = "model_not_found"
            return cls(status, _with_hint(error), code=code)
        log.error("internal error answering an HTTP request", exc_info=error)
        return cls(500, f"internal error: {type(error).__name__}: {error}; the daemon's log has the traceback "
                   "(look for 'internal error answering an HTTP request')", code="internal")

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))} if self.retry_after else {}


def _with_hint(error: AnemllError) -> str:
    return f"{error.message}: {error.hint}" if error.hint else error.message


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request's JSON object, read at most ``limit`` bytes far (413 past
    it, without reading the rest) and within BODY_TIMEOUT_S (408)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, f"Content-Length {declared!r} is not a number", code="bad_request")
        if int(declared) > limit:
            raise _too_large(int(declared), limit)
    body = bytearray()

    async def read() -> None:
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit:
                raise _too_large(len(body), limit)
    try:
        await asyncio.wait_for(read(), BODY_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {BODY_TIMEOUT_S:g} s",
                       code="timeout") from None
    if not body:
        raise ApiError(400, "the request has no body: send a JSON object", code="bad_request")
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}", code="bad_request") from None
    if not isinstance(value, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(value).__name__}", code="bad_request")
    return value


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"the request body of {size} bytes is larger than the {limit} allowed: send a shorter "
                    "prompt, or raise [http] max_body_bytes in the daemon's settings.toml", code="too_large")


# -- fields ---------------------------------------------------------------------

def refuse_unknown(body: Mapping[str, Any], known: tuple[str, ...], where: str = "",
                   unsupported: Mapping[str, str] | None = None) -> None:
    """400 naming the first field that is not in ``known``: ``unsupported``
    says why for fields we know of and do not implement."""
    for key in body:
        if key in known:
            continue
        name = f"{where}{key}"
        if unsupported and key in unsupported:
            raise ApiError(400, f"{name} is not supported: {unsupported[key]}", param=name, code="unsupported_field")
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.75)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ApiError(400, f"unknown field {name!r}{hint}; this server reads: {', '.join(known)}",
                       param=name, code="unknown_field")


def take(body: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    """``body[key]`` if present and not null, checked to be ``kind`` (bool is
    never a number here); None when absent."""
    value = body.get(key)
    if value is None:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    elif float in kinds and isinstance(value, int):
        ok = True
    else:
        ok = isinstance(value, kinds)
    if not ok:
        names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
                 dict: "an object"}
        want = " or ".join(names.get(k, k.__name__) for k in kinds if not (k is int and float in kinds))
        raise ApiError(400, f"{where}{key} must be {want}, got {json.dumps(value)[:60]}", param=f"{where}{key}",
                       code="bad_request")
    return value


INTEGER_FIELDS = ("max_tokens", "top_k", "seed")  # the protocol's whole-number sampling fields


def number_kind(field: str) -> type | tuple[type, ...]:
    """What ``take`` should accept for the protocol's sampling ``field``."""
    return int if field in INTEGER_FIELDS else (int, float)


def duration(value: Any, name: str) -> float | None:
    """Ollama's keep_alive: a duration string, seconds, negative = forever."""
    from shared.settings import FOREVER, parse_duration

    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        return FOREVER
    if isinstance(value, str) and value.strip().startswith("-"):
        return FOREVER
    try:
        return parse_duration(value, name)
    except AnemllError as e:
        raise ApiError(400, f"{name} = {json.dumps(value)} is not a duration: {e.hint}", param=name,
                       code="bad_request") from None


# -- a generation's events, worker thread -> event loop --------------------------------

class EventStream:
    """The ``service.Sink`` of one HTTP generation."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = 0.0):
        self._loop = loop
        self._interval = interval
        self._woke_at: float | None = None
        self._lock = threading.Lock()
        self._events: list[tuple[Any, ...]] = []
        self._woken = False
        self._wake = asyncio.Event()
        self._oldest: float | None = None  # when the oldest event not taken yet arrived
        self.generation: Generation | None = None
        self.finished = False  # done or error taken

    # -- the sink (model worker thread) --
    def progress(self, part: str, fraction: float) -> None:
        self._put(("progress", part, fraction))

    def token(self, text: str, token_ids: list[int]) -> None:
        self._put(("token", text, token_ids))

    def done(self, fields: dict[str, Any]) -> None:
        self._put(("done", fields))

    def error(self, error: AnemllError) -> None:
        self._put(("error", error))

    def _put(self, event: tuple[Any, ...]) -> None:
        now = time.monotonic()
        with self._lock:
            self._events.append(event)
            stalled = self._oldest is not None and now - self._oldest > STALL_S
            if self._oldest is None:
                self._oldest = now
            due = event[0] != "token" or self._woke_at is None or now - self._woke_at >= self._interval
            wake = due and not self._woken
            if wake:
                self._woken, self._woke_at = True, now
        if stalled and self.generation is not None and not self.generation.cancelled:
            log.info("an HTTP client has not read its stream for %.0f s: cancelling its generation", STALL_S)
            self.generation.cancel()
        if wake:
            try:
                self._loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:  # the loop is closed: the daemon is stopping
                pass

    # -- the event loop --
    async def next(self, timeout: float | None = None) -> list[tuple[Any, ...]]:
        """Every event since the last call, waiting up to ``timeout`` seconds for
        one; [] when none came."""
        while True:
            with self._lock:
                if self._events:
                    events, self._events, self._woken, self._oldest = self._events, [], False, None
                    self.finished = self.finished or events[-1][0] in ("done", "error")
                    return events
                self._woken = False
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                return []

    def cancel(self) -> None:
        if self.generation is not None and not self.finished:
            self.generation.cancel()


async def _next_unless_gone(stream: EventStream, gone: asyncio.Future, timeout: float | None = None) -> Events:
    """The stream's next events (waiting up to ``timeout``); ClientGone, with
    the generation cancelled, if the client disconnects first."""
    events = asyncio.ensure_future(stream.next(timeout))
    finished, _ = await asyncio.wait({events, gone}, return_when=asyncio.FIRST_COMPLETED)
    if events not in finished:
        events.cancel()
        stream.cancel()
        log.info("an HTTP client left before its answer: generation cancelled")
        raise ClientGone()
    return events.result()


class ClientGone(Exception):
    """The client disconnected; there is nobody to answer."""


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# -- running a generation for a handler ------------------------------------------------

KEEPALIVE_S = 5.0  # while a model loads or a long prompt prefills, streams get a sign of life this often

Events = list[tuple[Any, ...]]


def build_generate(rid: str, shown: Mapping[str, str], **fields: Any):
    """The protocol's ``Generate`` record from a dialect's fields, every check
    run under the name the client used (``shown``: protocol name -> client's)."""
    given = {k: v for k, v in fields.items() if v is not None}
    checks = {f.name: f.metadata["check"] for f in dataclasses.fields(p.Generate)}
    for key, value in given.items():
        try:
            checks[key](shown.get(key, key), value)
        except AnemllError as e:
            raise ApiError(400, _with_hint(e), param=shown.get(key, key), code="bad_request") from None
    try:
        return p.Generate(id=rid, **given)
    except AnemllError as e:
        raise ApiError(400, _with_hint(e), code="bad_request") from None


def start(service: Any, req: Any) -> EventStream:
    """Submit ``req``; raises ApiError for what fails at once (404, 503 busy or converting)."""
    stream = EventStream(asyncio.get_running_loop(), service.settings.stream_interval_seconds)
    try:
        stream.generation = service.generate(req, stream)
    except AnemllError as e:
        raise ApiError.of(e) from None
    return stream


async def first_events(request: Request, stream: EventStream) -> Events:
    """The events up to the first token, `done` or error, or what came within
    KEEPALIVE_S (load progress, or nothing): start the response then, with a
    keep-alive. Waiting for them first lets an early error (the model failed
    to load) still get its own status code."""
    gone = asyncio.ensure_future(_disconnected(request))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + KEEPALIVE_S
    got: Events = []
    try:
        while not any(kind != "progress" for kind, *_ in got) and (left := deadline - loop.time()) > 0:
            got += await _next_unless_gone(stream, gone, left)
        return got
    finally:
        gone.cancel()


def failure(events: Events) -> ApiError | None:
    """The error ending ``events``, if they end in one (a cancelled `done`
    with the client still there means the daemon is stopping)."""
    if not events:
        return None
    kind, *rest = events[-1]
    if kind == "error":
        return ApiError.of(rest[0])
    if kind == "done" and rest[0].get("done_reason") == "cancelled":
        return ApiError(503, "the generation was cancelled: the daemon is stopping, or the stream was not "
                        "read for too long; send the request again", code="cancelled", retry_after=2.0)
    return None


async def relay(stream: EventStream, first: Events):
    """Batches of events for a streaming response, ``[]`` for a keep-alive tick;
    closing it early (the client left) cancels the generation."""
    try:
        yield first
        while not stream.finished:
            yield await stream.next(KEEPALIVE_S)
    finally:
        stream.cancel()


async def collect(request: Request, stream: EventStream, first: Events) -> tuple[str, dict[str, Any]]:
    """The whole answer and the `done` statistics, for a response sent whole."""
    parts: list[str] = []
    done: dict[str, Any] = {}

    def take(events: Events) -> None:
        error = failure(events)
        if error is not None:
            raise error
        for kind, *rest in events:
            if kind == "token":
                parts.append(rest[0])
            elif kind == "done":
                done.update(rest[0])

    take(first)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        while not stream.finished:
            take(await _next_unless_gone(stream, gone))
    finally:
        gone.cancel()
    return "".join(parts), done


def progress_of(events: Events) -> str:
    """The last load progress in ``events`` as text ("" if none), for a comment line."""
    last = next((rest for kind, *rest in reversed(events) if kind == "progress"), None)
    return f"loading {last[0] or 'the model'} {last[1] * 100:.0f}%" if last else ""


def text_of(events: Events) -> str:
    return "".join(rest[0] for kind, *rest in events if kind == "token")


def done_of(events: Events) -> dict[str, Any] | None:
    return next((rest[0] for kind, *rest in events if kind == "done"), None)


def model_name(value: Any, param: str = "model") -> str:
    """A model name as clients send it: Ollama's tag ``:latest`` is the model itself."""
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{param} must be a model name (a string); GET /v1/models or /api/tags lists them",
                       param=param, code="bad_request")
    return value[: -len(":latest")] if value.endswith(":latest") else value
