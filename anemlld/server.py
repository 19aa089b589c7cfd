"""The daemon's socket: one ZeroMQ ROUTER speaking docs/protocol.md.

It owns the sockets, the requests in flight and their routing. What to run is
not its business: every op is a call on ``Service`` (anemlld/service.py), the
same layer the HTTP dialects call.

Threading. ZeroMQ sockets are not thread-safe, so one lock guards them and
the table of requests in flight: the loop running ``serve_forever`` holds it
while it handles what woke it, and lets go while it waits. Everything else
(model workers streaming tokens, threads waiting for a load, registry and job
listeners) puts encoded frames on a queue and then sends the queue itself if
the lock is free, or else wakes the loop with a byte on a pipe to send them.
A token therefore goes out from the model's worker thread without waking the
loop. Handed to the loop instead, it waits for the loop to get the GIL while
the worker computes the next token (up to the 5 ms switch interval): the time
to first token spent outside the engine's prefill was 3.4-5.8 ms that way
against 1.2-1.6 ms this way (bench/serving.py, two and four runs). The loop waits on the sockets'
ZMQ_FD (not zmq_poll, which would touch the sockets without the lock); that
descriptor only says "look again", so whoever held the lock last checks
ZMQ_EVENTS and wakes the loop if a request is waiting.
The table of requests in flight is keyed by (socket, peer identity, request
id): replies are routed by that key, so two clients each get only their own
tokens, and ``cancel`` only reaches the sender's own requests.

Every token event wakes the client and ZeroMQ's I/O threads on both sides.
When no CPU is idle, those threads run in the model thread's place: on the
2-core test machine with other jobs using a core or more, one event per token
cost the pico demo model (about 250 tok/s) 6-10% of its decode speed, against
0-3% with no event between the first token and ``done``. So token events of
one answer go out at most every ``stream_interval_seconds`` (settings, 20 ms
by default): the first token goes at once, tokens coming faster than that
are held and go together (``token_ids`` lists them all) with the next one due
or with ``done``. Models slower than 50 tok/s, which is most of them on the
Neural Engine, still get one event per token.

A peer that has gone away is noticed when sending to it fails
(ROUTER_MANDATORY): its generations are cancelled and its watches dropped.
No message can stop the loop: every handler is wrapped, and an unexpected
exception becomes an ``internal`` error for that request and a logged traceback.
"""
from __future__ import annotations

import errno
import logging
import os
import queue
import select
import socket
import stat
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import zmq

from anemlld import __version__
from anemlld.registry import ModelEntry
from anemlld.service import Generation, Service, wire_safe
from shared import protocol as p
from shared.errors import AnemllError
from shared.protocol import ProtocolError, encode_error, encode_event

log = logging.getLogger(__name__)

POLL_MS = 1000
RECV_BATCH = 64  # messages read from one socket before looking at the others
SEND_HWM = 100_000  # queued replies per peer before it counts as gone
SHUTDOWN_GRACE_S = 2.0  # for cancelled generations to send their `done`
JOB_OPS = ("convert", "retry")

Peer = tuple[int, bytes]  # (socket index, ROUTER identity)
Key = tuple[int, bytes, str]  # (socket index, identity, request id)


@dataclass
class _Active:
    """A request that outlives its handler: a generation, a watch, a load."""

    op: str
    generation: Generation | None = None  # a generate's handle, for cancel


@dataclass
class _Out:
    """A frame for the loop to send. ``tracked`` frames belong to an entry of the
    active table and are dropped once it is gone (finished, cancelled, peer left)."""

    peer: Peer | None
    rid: str | None
    frame: bytes | None
    final: bool = False
    tracked: bool = False
    broadcast: tuple[str, dict] | None = None  # (event, fields) for every watch


class Server:
    def __init__(self, service: Service, stream_interval: float | None = None):
        """``stream_interval``: least seconds between token events of one
        stream (see the module docstring); None: the settings' value."""
        self.service = service
        settings = self.settings = service.settings
        self.stream_interval = settings.stream_interval_seconds if stream_interval is None else stream_interval
        registry, residency, jobs = service.registry, service.residency, service.jobs
        self.jobs = jobs
        self._ctx = zmq.Context()
        self._sockets: list[zmq.Socket] = []
        self._auth = None
        self._outbox: queue.SimpleQueue[_Out] = queue.SimpleQueue()
        self._lock = threading.Lock()  # the sockets and ``_active``; never waited for by a sender
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stopping = False
        self._closed = False
        self._bound_path: Path | None = None  # the socket file this server made (and removes)
        self._active: dict[Key, _Active] = {}
        self._handlers: dict[str, Callable[[Peer, Any], None]] = {
            "hello": self._hello, "models": self._models, "ps": self._ps, "jobs": self._jobs,
            "watch": self._watch, "generate": self._generate, "cancel": self._cancel, "load": self._load,
            "unload": self._unload, "pin": self._pin, "convert": self._convert, "retry": self._retry}
        self.capabilities = [op for op in p.REQUESTS if jobs is not None or op not in JOB_OPS] + \
            list(p.FIELD_CAPABILITIES)
        self._unsubscribe = [registry.subscribe(self._on_model_change), residency.listen(self._on_load_progress)]
        if jobs is not None and callable(getattr(jobs, "subscribe", None)):
            unsubscribe = jobs.subscribe(self.job_progress)
            if callable(unsubscribe):
                self._unsubscribe.append(unsubscribe)

    # -- lifecycle ---------------------------------------------------------------
    def bind(self) -> None:
        """Bind the ipc socket (and TCP with CURVE if settings turn it on).
        Raises AnemllError if another daemon is serving there."""
        if self._bound_path is not None:
            return
        self.settings.make_dirs()
        path = self.settings.socket_path
        _clear_stale_socket(path)
        router = self._router()
        self._sockets.append(router)
        router.bind(self.settings.endpoint)
        self._bound_path = path
        os.chmod(path, 0o600)
        log.info("serving on %s", self.settings.endpoint)
        if self.settings.tcp is not None:
            self._sockets.append(self._bind_tcp())

    def serve_forever(self) -> None:
        """Serve until ``stop``; then cancel what runs and close the sockets."""
        try:
            if self._stopping:
                return
            self.bind()
            waiter = select.poll()
            for sock in self._sockets:
                waiter.register(sock.getsockopt(zmq.FD), select.POLLIN)
            waiter.register(self._wake_r, select.POLLIN)
            timeout = 0
            while not self._stopping:
                if timeout:
                    waiter.poll(timeout)
                try:
                    with self._lock:
                        self._drain_wakeups()
                        for index, sock in enumerate(self._sockets):
                            self._receive(index, sock)
                        self._flush()
                        timeout = 0 if self._readable() else POLL_MS
                except zmq.ZMQError as e:
                    if e.errno == zmq.ETERM:
                        break
                    log.error("using the sockets failed: %s", e)
                    timeout = POLL_MS
        finally:
            self.close()

    def stop(self) -> None:
        """Ask ``serve_forever`` to return. Safe from any thread and from a signal handler."""
        self._stopping = True
        self._wake()

    def job_progress(self, progress: Any) -> None:
        """Jobs call this (from any thread) with a conversion's progress: a mapping
        or record with job, model (or name), stage, part, fraction, message."""
        get = progress.get if isinstance(progress, Mapping) else lambda k, d=None: getattr(progress, k, d)
        fields = {"kind": "convert", "job": get("job", get("id")), "model": get("model", get("name")),
                  "stage": get("stage", ""), "part": get("part", ""), "fraction": float(get("fraction", 0.0) or 0.0),
                  "eta_seconds": get("eta_seconds"), "message": get("message", "") or ""}
        self._post(_Out(None, None, None, broadcast=("progress", wire_safe(fields))))

    # -- sockets -----------------------------------------------------------------
    def _router(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 200)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a peer that left raises: we cancel its work
        # Larger than the limit we answer with too_large; only past this does ZeroMQ drop the peer silently.
        sock.setsockopt(zmq.MAXMSGSIZE, 8 * self.settings.max_frame_bytes + (64 << 10))
        sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        return sock

    def _bind_tcp(self) -> zmq.Socket:
        import zmq.auth
        from zmq.auth.thread import ThreadAuthenticator

        tcp = self.settings.tcp
        if not zmq.has("curve"):
            raise AnemllError("TCP is enabled in the settings but this ZeroMQ has no CURVE support",
                              "install a pyzmq built with libsodium/CURVE, or set [tcp] enabled = false")
        self._auth = ThreadAuthenticator(self._ctx)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(tcp.client_keys))
        public, secret = zmq.auth.load_certificate(str(tcp.server_key))
        if secret is None:
            raise AnemllError(f"{tcp.server_key} holds no secret key", "point [tcp] server_key at a .key_secret file")
        sock = self._router()
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True
        try:
            sock.bind(tcp.bind)
        except zmq.ZMQError as e:
            sock.close(0)
            raise AnemllError(f"cannot listen on {tcp.bind}: {e}", "choose another [tcp] bind address or port") from e
        log.info("serving on %s (CURVE, clients from %s)", tcp.bind, tcp.client_keys)
        return sock

    def _receive(self, index: int, sock: zmq.Socket) -> None:
        for _ in range(RECV_BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            try:
                self._on_message((index, frames[0]), frames[1:])
            except Exception:  # the loop must survive anything a message does
                log.exception("handling a message failed")

    def _send(self, out: _Out) -> None:
        if out.peer is None or out.frame is None or self._closed:
            return
        key = (*out.peer, out.rid)
        if out.tracked and key not in self._active:
            return  # cancelled, finished, or its client left
        if out.final and out.tracked:
            self._active.pop(key, None)
        try:
            self._sockets[out.peer[0]].send_multipart([out.peer[1], out.frame], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            if e.errno in (errno.EHOSTUNREACH, errno.EAGAIN):
                self._peer_gone(out.peer, "has left" if e.errno == errno.EHOSTUNREACH else "is not reading")
            else:
                log.error("cannot send to a client: %s", e)

    def _flush(self, limit: int = 1000) -> None:
        """Send what the other threads queued; at most ``limit`` at a time, so
        that a fast stream cannot starve incoming requests."""
        for _ in range(limit):
            try:
                out = self._outbox.get_nowait()
            except queue.Empty:
                return
            try:
                if out.broadcast is not None:
                    event, fields = out.broadcast
                    for (index, ident, rid), active in list(self._active.items()):
                        if active.op == "watch":
                            self._send(_Out((index, ident), rid, encode_event(rid, event, **fields), tracked=True))
                else:
                    self._send(out)
            except Exception:
                log.exception("sending an event failed")
        self._wake()  # more to send: come back after looking at the sockets

    def _post(self, out: _Out) -> None:
        """Send a frame (any thread): now, if no one else is using the sockets;
        else the loop sends it when it lets go of them."""
        self._outbox.put(out)
        if not self._lock.acquire(blocking=False):
            self._wake()
            return
        try:
            if not self._closed:
                self._flush()
                if self._readable():  # our sends may have taken the signal the loop waits for
                    self._wake()
        except zmq.ZMQError as e:
            log.error("sending an event failed: %s", e)
            self._wake()
        finally:
            self._lock.release()

    def _readable(self) -> bool:
        """Whether a request is waiting on any socket (caller holds the lock)."""
        return any(sock.getsockopt(zmq.EVENTS) & zmq.POLLIN for sock in self._sockets)

    def _wake(self) -> None:
        if self._wake_w < 0:
            return
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (the loop will wake anyway) or closed

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _peer_gone(self, peer: Peer, why: str) -> None:
        keys = [k for k in self._active if k[:2] == peer]
        if keys:
            log.info("a client %s: cancelling its %d request(s)", why, len(keys))
        for key in keys:
            active = self._active.pop(key)
            if active.generation is not None:
                active.generation.cancel()

    def close(self) -> None:
        """Cancel what runs, give it a moment to say so, close the sockets.
        ``serve_forever`` does this on its way out; call it yourself only for a
        server that never served."""
        with self._lock:
            if self._closed:
                return
            for key, active in list(self._active.items()):
                if active.generation is not None:
                    active.generation.cancel()  # a queued one says `done` through its sink, flushed below
                elif active.op == "watch":
                    self._send(_Out(key[:2], key[2], encode_event(key[2], "done", done_reason="cancelled"),
                                    final=True, tracked=True))
        end = time.monotonic() + SHUTDOWN_GRACE_S
        while time.monotonic() < end:
            with self._lock:
                self._flush()
                if not any(a.op == "generate" for a in self._active.values()):
                    break
            time.sleep(0.01)  # without the lock: the cancelled generations send their `done` themselves
        with self._lock:
            self._flush()
            self._closed = True
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        for sock in self._sockets:
            sock.close(linger=200)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()
        if self._bound_path is not None:
            self._bound_path.unlink(missing_ok=True)
        fds, self._wake_w = (self._wake_r, self._wake_w), -1
        for fd in fds:
            os.close(fd)
        if self._bound_path is not None:
            log.info("stopped serving")

    # -- dispatch ------------------------------------------------------------------
    def _on_message(self, peer: Peer, body: list[bytes]) -> None:
        if len(body) != 1:
            rid = next((rid for rid in map(_peek_id, body) if rid is not None), None)
            log.warning("dropped a message of %d frames%s", len(body), "" if rid is None else f" (id {rid!r})")
            if rid is not None:
                self._reply(peer, rid, encode_error(rid, "bad_request", f"a request is one frame, got {len(body)}",
                                                    "send one msgpack map as a single frame"))
            return
        try:
            request = p.decode_request(body[0], self.settings.max_frame_bytes)
        except ProtocolError as e:
            frame = e.to_frame()
            if frame is None:
                log.warning("dropped a request without a usable id: %s", e.message)
            else:
                log.info("refused request %r: %s %s", e.request_id, e.code, e.message)
                self._reply(peer, e.request_id, frame)
            return
        log.debug("request %s %s", request.op, request.id)
        try:
            if (*peer, request.id) in self._active:
                raise ProtocolError("bad_request", f"id {request.id!r} is already used by a request in flight",
                                    request.id, "give every request in flight its own id")
            handler = self._handlers[request.op]
            if request.op in JOB_OPS and self.jobs is None:
                raise ProtocolError("unknown_op", f"this daemon does not run conversion jobs ({request.op})",
                                    request.id, "use an anemlld started with its drop folder and jobs")
            handler(peer, request)
        except AnemllError as e:
            self._reply(peer, request.id, _error_frame(request.id, e))
        except Exception as e:
            log.exception("request %s %r failed", request.op, request.id)
            self._reply(peer, request.id, encode_error(request.id, "internal", f"{type(e).__name__}: {e}",
                                                       "this is a bug in anemlld; its log has the details"))

    def _reply(self, peer: Peer, rid: str | None, frame: bytes) -> None:
        """A reply from the loop itself (no queue needed)."""
        self._send(_Out(peer, rid, frame))

    def _emit(self, peer: Peer, rid: str, event: str, **fields: Any) -> None:
        """An event of a tracked request, from any thread."""
        self._post(_Out(peer, rid, encode_event(rid, event, **fields), final=event in p.FINAL_EVENTS,
                        tracked=True))

    def _emit_error(self, peer: Peer, rid: str, error: Exception) -> None:
        frame = _error_frame(rid, error) if isinstance(error, AnemllError) else encode_error(
            rid, "internal", f"{type(error).__name__}: {error}", "this is a bug in anemlld; its log has the details")
        self._post(_Out(peer, rid, frame, final=True, tracked=True))

    def _track(self, peer: Peer, rid: str, op: str) -> _Active:
        active = self._active[(*peer, rid)] = _Active(op)
        return active

    # -- ops answered at once --------------------------------------------------------
    def _hello(self, peer: Peer, req: p.Hello) -> None:
        if req.client:
            log.info("hello from %s", req.client)
        self._reply(peer, req.id, encode_event(req.id, "hello", server="anemlld", version=__version__,
                                               protocol=p.PROTOCOL_VERSION, capabilities=self.capabilities,
                                               max_frame_bytes=self.settings.max_frame_bytes,
                                               http=self.service.http_url))

    def _models(self, peer: Peer, req: p.Models) -> None:
        self._reply(peer, req.id, encode_event(req.id, "models", models=self.service.models()))

    def _ps(self, peer: Peer, req: p.Ps) -> None:
        self._reply(peer, req.id, encode_event(req.id, "ps", ps=self.service.ps()))

    def _jobs(self, peer: Peer, req: p.Jobs) -> None:
        self._reply(peer, req.id, encode_event(req.id, "jobs", jobs=self.service.jobs_list()))

    def _cancel(self, peer: Peer, req: p.Cancel) -> None:
        key = (*peer, req.target)
        active = self._active.get(key)
        if active is None or active.op not in ("generate", "watch"):
            what = "cannot be cancelled (only generate and watch can)" if active else "is not running"
            raise AnemllError(f"request {req.target!r} {what}", "cancel the id of one of your running requests",
                              code="not_found")
        self._reply(peer, req.id, encode_event(req.id, "ok"))
        if active.op == "watch":
            self._send(_Out(peer, req.target, encode_event(req.target, "done", done_reason="cancelled"),
                            final=True, tracked=True))
        elif active.generation is not None:
            active.generation.cancel()

    def _unload(self, peer: Peer, req: p.Unload) -> None:
        self.service.unload(req.model)
        self._reply(peer, req.id, encode_event(req.id, "ok"))

    def _convert(self, peer: Peer, req: p.Convert) -> None:
        result = self.service.convert(req.path, req.name, req.options)
        self._reply(peer, req.id, encode_event(req.id, "ok", **result))

    def _retry(self, peer: Peer, req: p.Retry) -> None:
        self._reply(peer, req.id, encode_event(req.id, "ok", **self.service.retry(req.name)))

    # -- streams ---------------------------------------------------------------------
    def _watch(self, peer: Peer, req: p.Watch) -> None:
        self._track(peer, req.id, "watch")

    def _generate(self, peer: Peer, req: p.Generate) -> None:
        active = _Active("generate")
        active.generation = self.service.generate(req, _SocketSink(self, peer, req.id, req.model))
        self._active[(*peer, req.id)] = active

    def _load(self, peer: Peer, req: p.Load) -> None:
        self.service.servable(req.model)
        self._track(peer, req.id, "load")
        progress = self._load_progress(peer, req.id, req.model)
        self._in_thread(peer, req.id, lambda: self.service.load(req.model, req.keep_alive, progress))

    def _pin(self, peer: Peer, req: p.Pin) -> None:
        if not req.pin:
            self.service.pin(req.model, False)
            self._reply(peer, req.id, encode_event(req.id, "ok"))
            return
        self.service.servable(req.model)
        self._track(peer, req.id, "pin")
        progress = self._load_progress(peer, req.id, req.model)
        self._in_thread(peer, req.id, lambda: self.service.pin(req.model, True, progress))

    def _in_thread(self, peer: Peer, rid: str, work: Callable[[], Any]) -> None:
        """Run a blocking op (waiting for a load) off the loop; answer ``ok`` or its error."""
        def target() -> None:
            try:
                work()
                self._emit(peer, rid, "ok")
            except Exception as e:
                if not isinstance(e, AnemllError):
                    log.exception("request %r failed", rid)
                self._emit_error(peer, rid, e)
        threading.Thread(target=target, name=f"request-{rid}", daemon=True).start()

    def _load_progress(self, peer: Peer, rid: str, model: str) -> Callable[[str, float], None]:
        def progress(part: str, fraction: float) -> None:
            self._emit(peer, rid, "progress", kind="load", model=model, stage="load", part=part,
                       fraction=round(float(fraction), 4))
        return progress

    # -- listeners (any thread) -------------------------------------------------------
    def _on_model_change(self, entry: ModelEntry) -> None:
        self._post(_Out(None, None, None, broadcast=("model", {"model": wire_safe(entry.to_wire())})))

    def _on_load_progress(self, model: str, part: str, fraction: float) -> None:
        fields = {"kind": "load", "model": model, "stage": "load", "part": part, "fraction": round(float(fraction), 4)}
        self._post(_Out(None, None, None, broadcast=("progress", fields)))

# -- module helpers ------------------------------------------------------------------

class _TokenBatch:
    """The tokens of one stream not sent yet. ``add`` says when they are due:
    always for the first, then once ``interval`` seconds have passed since
    the last ``take`` (every time when the interval is 0)."""

    def __init__(self, interval: float):
        self.interval = interval
        self.text, self.ids = "", []
        self.sent_at: float | None = None

    @property
    def pending(self) -> bool:
        return bool(self.text or self.ids)

    def add(self, text: str, token_ids: Any) -> bool:
        self.text += text
        self.ids.extend(token_ids)
        return self.sent_at is None or time.monotonic() - self.sent_at >= self.interval

    def take(self) -> dict[str, Any]:
        fields = {"text": self.text, "token_ids": self.ids}
        self.text, self.ids, self.sent_at = "", [], time.monotonic()
        return fields


class _SocketSink:
    """A generation's events as frames to its client, tokens batched by the stream interval."""

    def __init__(self, server: Server, peer: Peer, rid: str, model: str):
        self.server, self.peer, self.rid = server, peer, rid
        self.batch = _TokenBatch(server.stream_interval)
        self.progress = server._load_progress(peer, rid, model)

    def token(self, text: str, token_ids: list[int]) -> None:
        if self.batch.add(text, token_ids):
            self.server._emit(self.peer, self.rid, "token", **self.batch.take())

    def done(self, fields: dict[str, Any]) -> None:
        if self.batch.pending:
            self.server._emit(self.peer, self.rid, "token", **self.batch.take())
        self.server._emit(self.peer, self.rid, "done", **fields)

    def error(self, error: AnemllError) -> None:
        self.server._emit_error(self.peer, self.rid, error)


def _error_frame(rid: str, error: AnemllError) -> bytes:
    code = error.code
    if code not in p.ERROR_CODES:
        code = "bad_request" if code == "bad_input" else "model_failed"
    extra = error.fields if isinstance(error, ProtocolError) else {}
    return encode_error(rid, code, error.message, error.hint, **extra)


def _peek_id(frame: bytes) -> str | None:
    """The id in a frame, if it has a usable one (for answering a malformed message)."""
    try:
        return p.decode_request(frame, 1 << 30).id
    except ProtocolError as e:
        return e.request_id
    except Exception:
        return None


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket file left by a daemon that died; refuse if one is alive there."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise AnemllError(f"{path} exists and is not a socket", "remove it, or set [paths] runtime to another folder")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing the stale socket %s", path)
        path.unlink(missing_ok=True)
        return
    except OSError as e:
        raise AnemllError(f"cannot check the socket {path}: {e}", "remove it if no anemlld is running") from e
    finally:
        probe.close()
    raise AnemllError(f"another anemlld is already serving at {path}",
                      "stop it first, or start this one with another --home")
