"""The client's end of the socket: one DEALER connected to the daemon's
endpoint, request ids, and the events of several requests in flight sorted by
id (docs/protocol.md, "Transport").

Everything that means "the daemon cannot be talked to" is a ``NotReachable``
(exit code 2 at the command line); an ``error`` event is a ``ProtocolError``
raised by ``Connection.call`` / ``Event.raise_for_error`` (exit code 1).
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator

import zmq

from client import __version__
from shared.errors import AnemllError
from shared.protocol import (PROTOCOL_VERSION, Cancel, Event, Hello, ProtocolError, Request, decode_event,
                             encode_request)
from shared.settings import Settings

CLIENT_NAME = f"anemll-chat {__version__}"
HELLO_TIMEOUT = 2.0  # seconds for the daemon to answer `hello` before we call it not running
REPLY_TIMEOUT = 30.0  # for ops answered at once (models, ps, jobs, cancel, convert ...)
PING_AFTER = 15.0  # a stream silent this long: ask `hello` to see whether the daemon is still there
LOST_AFTER = 60.0  # ... and no word at all for this much longer: it is gone
TICK = 0.1  # longest wait on the socket, so Ctrl-C and redraws are served promptly
START_HINT = "Start it with `anemlld` in a terminal, or `anemlld install` for the LaunchAgent."


class NotReachable(AnemllError):
    """The daemon cannot be talked to: not running, gone, or speaking another protocol."""

    code = "not_reachable"


class Interrupted(Exception):
    """The user pressed Ctrl-C while a request was running, and it was cancelled."""


class Connection:
    """A DEALER socket to one daemon. Ids are "1", "2", ... per connection;
    events for ids nobody waits for any more (finished, abandoned) are dropped."""

    def __init__(self, settings: Settings, *, hello_timeout: float = HELLO_TIMEOUT,
                 reply_timeout: float = REPLY_TIMEOUT, ping_after: float = PING_AFTER,
                 lost_after: float = LOST_AFTER):
        self.settings = settings
        self.hello_timeout = hello_timeout
        self.reply_timeout = reply_timeout
        self.ping_after = ping_after
        self.lost_after = lost_after
        self.hello: Event | None = None
        self._socket: zmq.Socket | None = None
        self._counter = 0
        self._open: set[str] = set()  # ids sent whose final event has not been read
        self._inbox: deque[Event] = deque()
        self._last_heard = time.monotonic()
        self._ping_id: str | None = None

    # -- opening and closing ----------------------------------------------------

    def open(self) -> Event:
        """Connect and say hello; NotReachable when nobody answers or the versions differ."""
        path = self.settings.socket_path
        if not path.exists():
            raise NotReachable(f"anemlld is not running (no socket at {path}). {START_HINT}")
        self._socket = zmq.Context.instance().socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)  # never hang on exit over unsent frames
        self._socket.connect(self.settings.endpoint)
        try:
            self.hello = self._hello(path)
        except BaseException:
            self.close()
            raise
        return self.hello

    def _hello(self, path) -> Event:
        rid = self.send(Hello(id=self.next_id(), client=CLIENT_NAME))
        event = self.wait({rid}, timeout=self.hello_timeout, watchdog=False)
        if event is None:
            raise NotReachable(f"anemlld is not running (no answer at {path} within "
                               f"{self.hello_timeout:g} s). {START_HINT}")
        if event.event == "error" and event.get("code") == "unsupported_version":
            raise version_mismatch(event.get("protocol"), event.get("hint", ""))
        event.raise_for_error()
        if event.event != "hello" or event.get("protocol") != PROTOCOL_VERSION:
            raise version_mismatch(event.get("protocol"), "")
        return event

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    # -- sending and receiving ---------------------------------------------------

    def next_id(self) -> str:
        self._counter += 1
        return str(self._counter)

    def send(self, request: Request) -> str:
        """Send ``request`` and return its id (make it with ``next_id``)."""
        assert self._socket is not None, "open() the connection first"
        self._socket.send(encode_request(request))
        self._open.add(request.id)
        self._last_heard = time.monotonic()  # silence is counted from our latest question
        return request.id

    def pending(self, rid: str) -> bool:
        """Whether ``rid`` was sent and its final event not yet read off the socket."""
        return rid in self._open or any(e.id == rid for e in self._inbox)

    def forget(self, rid: str) -> None:
        """Stop waiting for ``rid``: whatever still comes for it is dropped."""
        self._open.discard(rid)
        self._inbox = deque(e for e in self._inbox if e.id != rid)

    def wait(self, ids: set[str], timeout: float | None = None, *, watchdog: bool = True) -> Event | None:
        """The next event for one of ``ids``, or None after ``timeout`` seconds.
        With ``watchdog``, a daemon silent for ``ping_after`` is asked `hello`, and
        one silent for ``lost_after`` more raises NotReachable."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for event in self._inbox:
                if event.id in ids:
                    self._inbox.remove(event)
                    return event
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return None
            if watchdog:
                self._watch_over(now)
            step = TICK if deadline is None else min(TICK, deadline - now)
            self._receive(step)

    def call(self, request: Request, timeout: float | None = None) -> Event:
        """Send ``request`` and return its final event; error events raise ProtocolError."""
        rid = self.send(request)
        timeout = self.reply_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            event = self.wait({rid}, timeout=max(0.0, deadline - time.monotonic()))
            if event is None:
                self.forget(rid)
                raise NotReachable(f"anemlld did not answer {request.op!r} within {timeout:g} s",
                                   "its log may say why: see `anemlld` in its terminal, or the daemon's "
                                   f"log in {self.settings.logs_dir}")
            if event.final:
                event.raise_for_error()
                return event

    def stream(self, request: Request, cancellable: bool = True) -> Iterator[Event]:
        """Send ``request`` and yield its events up to and including the final one.
        Ctrl-C while streaming cancels a ``cancellable`` request (generate, watch),
        which then ends with done/cancelled; any other is left to the daemon and
        Interrupted raised."""
        rid = self.send(request)
        with cancel_on_interrupt() as interrupted:
            cancelled = False
            while True:
                if interrupted.is_set() and not cancelled:
                    cancelled = True
                    if not cancellable:
                        self.forget(rid)
                        raise Interrupted()
                    self.cancel(rid)
                event = self.wait({rid}, timeout=TICK)
                if event is None:
                    continue
                if event.final:
                    break
                yield event
        yield event  # the final one, with Ctrl-C back to its usual self

    def cancel(self, target: str, timeout: float = 5.0) -> None:
        """Ask the daemon to stop request ``target``; its own stream then ends with
        done/cancelled. A daemon that does not confirm in time: stop listening."""
        cid = self.send(Cancel(id=self.next_id(), target=target))
        event = self.wait({cid}, timeout=timeout)
        if event is None:
            self.forget(cid)
            self.forget(target)
            raise Interrupted()
        # `ok`, or `not_found` when it had just finished: either way its final event is on its way

    def _receive(self, timeout: float) -> None:
        assert self._socket is not None
        if not self._socket.poll(int(timeout * 1000)):
            return
        while True:
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._last_heard = time.monotonic()
            try:
                event = decode_event(frames[-1])
            except ProtocolError:
                continue  # a frame we cannot read is skipped, as unknown events are
            if event.id == self._ping_id:
                self._ping_id = None
                continue
            if event.id not in self._open:
                continue
            if event.final:
                self._open.discard(event.id)
            self._inbox.append(event)

    def _watch_over(self, now: float) -> None:
        silent = now - self._last_heard
        if silent >= self.ping_after and self._ping_id is None:
            self._ping_id = self.next_id()
            assert self._socket is not None
            self._socket.send(encode_request(Hello(id=self._ping_id, client=CLIENT_NAME)))
        if silent >= self.ping_after + self.lost_after:
            raise NotReachable(f"anemlld stopped answering (socket {self.settings.socket_path}); "
                               "it may have crashed or been stopped",
                               "its log may say why: see `anemlld` in its terminal, or the daemon's "
                               f"log in {self.settings.logs_dir}")


def version_mismatch(daemon_protocol: object, hint: str) -> NotReachable:
    if isinstance(daemon_protocol, int) and not isinstance(daemon_protocol, bool):
        side = ("update anemll-chat (the client)" if daemon_protocol > PROTOCOL_VERSION
                else "update anemlld (the daemon), then restart it")
        return NotReachable(f"anemlld speaks protocol {daemon_protocol} and this anemll-chat speaks "
                            f"{PROTOCOL_VERSION}: {side}")
    return NotReachable(f"anemlld does not speak protocol {PROTOCOL_VERSION} as this anemll-chat does: "
                        f"{hint or 'update the older of the two'}")


@contextlib.contextmanager
def cancel_on_interrupt() -> Iterator[threading.Event]:
    """While inside, the first Ctrl-C sets the yielded flag (the caller cancels its
    request and waits for it to end); a second one raises KeyboardInterrupt.
    Outside the main thread signals cannot be caught: the flag is never set."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def on_sigint(signum, frame):
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
