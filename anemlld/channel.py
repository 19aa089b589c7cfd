"""A channel between the daemon and one of its child processes (a model
worker, a conversion): msgpack maps back to back over a pair of pipe
descriptors, never pickle (msgpack delimits itself: no other framing). A pipe's
closing is the news in both directions: the reader gets end-of-file the
moment the other process is gone, however it went."""
from __future__ import annotations

import os
import select
import threading
from typing import Any, Mapping

import msgpack


class Channel:
    """msgpack maps over a pair of pipe descriptors. ``send`` is thread-safe;
    one thread at a time receives."""

    def __init__(self, rfd: int, wfd: int):
        self.rfd, self.wfd = rfd, wfd
        self._unpacker = msgpack.Unpacker(raw=False)
        self._send_lock = threading.Lock()
        self.closed = False

    def send(self, message: Mapping[str, Any]) -> None:
        data = memoryview(msgpack.packb(message, use_bin_type=True))
        with self._send_lock:
            while data:
                data = data[os.write(self.wfd, data):]

    def recv(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next map; None if ``timeout`` passed first. EOFError when the other end is gone."""
        while True:
            try:
                return next(self._unpacker)
            except StopIteration:
                pass
            if timeout is not None and not select.select([self.rfd], [], [], timeout)[0]:
                return None
            chunk = os.read(self.rfd, 1 << 16)
            if not chunk:
                raise EOFError("the other end of the channel is gone")
            self._unpacker.feed(chunk)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for fd in (self.wfd, self.rfd):
                try:
                    os.close(fd)
                except OSError:
                    pass
