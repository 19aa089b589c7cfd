"""The model worker: one process per loaded model, holding its engine, its
executor and its prefix cache, so that a crash in native code (Core ML, torch)
or the out-of-memory killer costs the requests on that model and nothing else,
and unloading gives the memory back to the system.

Both ends of the channel are here: ``main`` is the process
(``python -m anemlld.worker RFD WFD``, spawned, never forked: macOS, threads
and Core ML do not survive a fork), and ``Worker`` is the daemon's handle on
it, with the engine's side of what residency calls (``request``, ``ctx``,
``close``) plus ``pid`` and ``memory_bytes``.

The channel is a pair of pipes carrying msgpack maps back to back (msgpack
delimits itself; never pickle). The daemon sends ``load`` once, then
``generate`` (with the request's ``structure``: format, tools, tool_choice;
its grammar is compiled and applied here, never in the daemon) and
``cancel``; the worker answers ``progress`` while loading, then ``loaded``
or ``load_failed``, and per request ``tokens`` (text and token ids, batched
like the socket's token events: the first at once, then at most every
``stream_interval_seconds``), then ``done`` (the statistics and the
answer's ``tool_calls``) or
``error`` (an AnemllError's fields). Pipes rather than a socket because their
closing is the news in both directions: the daemon reads end-of-file the
moment a worker dies, however it died, and a worker reads end-of-file the
moment the daemon is gone, kill -9 included, and exits (no orphans). Nothing
touches the file system, so there is nothing for another user to connect to.

A worker reads the channel on a second thread, so a ``cancel`` reaches the
running generation between two tokens.
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from anemlld.channel import Channel
from shared.errors import AnemllError

if TYPE_CHECKING:
    from anemlld.registry import ModelEntry
    from anemlld.runtime.engine import Done, Token
    from shared.settings import Settings

log = logging.getLogger(__name__)

CRASH_HOOK = "ANEMLL_TEST_WORKER_CRASH"  # "load": the worker kills itself while loading (crash-loop tests)
POLL_S = 0.05  # how often a request waiting for tokens looks at its cancel flag
CLOSE_GRACE_S = 3.0  # for a worker told to go to exit before it is killed
REPO = Path(__file__).resolve().parents[1]


class WorkerDied(AnemllError):
    """The worker process ended by itself; ``reason`` says how ("killed by signal 9")."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"model {name!r} stopped ({reason}) and will be reloaded on the next request",
                         "the daemon's log has the details", stage="worker", code="model_failed")
        self.reason = reason


# -- the daemon's side ------------------------------------------------------------------

def spawn(settings: "Settings", entry: "ModelEntry", progress: Callable[[str, float], None] | None = None
          ) -> "Worker":
    """Start a worker for ``entry`` and wait until its model is loaded. Raises
    the load's AnemllError, or WorkerDied if the process ended while loading."""
    worker = Worker(entry.name)
    worker.start({"op": "load", "path": str(entry.path), "cache_states": settings.prefix_cache_states,
                  "cache_bytes": settings.prefix_cache_bytes, "stream_interval": settings.stream_interval_seconds,
                  "log_level": settings.log_level}, progress)
    return worker


class Worker:
    """A worker process as residency sees it: an engine whose requests run elsewhere."""

    def __init__(self, name: str):
        self.name = name
        self.ctx: int | None = None
        self.load_ms = 0.0
        self.proc: subprocess.Popen | None = None
        self.channel: Channel | None = None
        self.exited = threading.Event()  # set by the waiter thread when the process is gone
        self.reason = ""  # how it ended: "killed by signal 9", "exited with status 1"
        self.on_exit: Callable[[], None] | None = None  # called once the process is gone
        self._closing = False
        self._ids = iter(range(1, 1 << 62))

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return not self.exited.is_set()

    def start(self, load: Mapping[str, Any], progress: Callable[[str, float], None] | None) -> None:
        to_worker_r, to_worker_w = os.pipe()
        from_worker_r, from_worker_w = os.pipe()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        try:
            # stdin from /dev/null: a worker never competes with the daemon for a terminal
            self.proc = subprocess.Popen([sys.executable, "-m", "anemlld.worker", str(to_worker_r),
                                          str(from_worker_w)], pass_fds=(to_worker_r, from_worker_w),
                                         stdin=subprocess.DEVNULL, env=env)
        finally:
            os.close(to_worker_r)
            os.close(from_worker_w)
        self.channel = Channel(from_worker_r, to_worker_w)
        threading.Thread(target=self._wait, name=f"worker-{self.name}-wait", daemon=True).start()
        try:
            self.channel.send(load)
            while True:
                message = self._recv()
                kind = message.get("ev")
                if kind == "progress" and progress is not None:
                    progress(message["part"], message["fraction"])
                elif kind == "loaded":
                    self.ctx, self.load_ms = message.get("ctx"), message.get("load_ms", 0.0)
                    log.debug("worker %d for %s loaded in %.0f ms", self.pid, self.name, self.load_ms)
                    return
                elif kind == "load_failed":
                    raise _error(message)
        except BaseException:
            self.close()
            raise

    def request(self, *, prompt: str | None = None, messages: list[dict] | None = None,
                options: Mapping[str, Any] | None = None, session_id: str | None = None,
                cancel: threading.Event | None = None, structure: Mapping[str, Any] | None = None
                ) -> Iterator["Token | Done"]:
        """One request, run in the worker: its tokens, then Done. Raises the
        request's AnemllError, or WorkerDied if the process ends meanwhile."""
        from anemlld.runtime.engine import Done, Stats, Token  # plain dataclasses; numpy, no torch

        rid = next(self._ids)
        self._send({"op": "generate", "id": rid, "prompt": prompt, "messages": messages,
                    "options": dict(options or {}), "session_id": session_id,
                    "structure": dict(structure) if structure else None})
        cancelled = finished = False
        try:
            while not finished:
                message = self._recv(POLL_S)
                if cancel is not None and cancel.is_set() and not cancelled:
                    cancelled = True
                    self._send({"op": "cancel", "id": rid})
                if message is None or message.get("id") != rid:
                    continue  # a poll, or the tail of an earlier request whose reader stopped early
                kind = message["ev"]
                if kind == "tokens":
                    yield Token(message["text"], message["token_ids"])
                elif kind == "done":
                    finished = True
                    yield Done(message["text"], message["token_ids"], Stats(**message["stats"]),
                               message.get("tool_calls"))
                elif kind == "error":
                    finished = True
                    raise _error(message)
        finally:
            if not finished and not cancelled and self.alive:  # the consumer stopped reading: stop the worker too
                try:
                    self.channel.send({"op": "cancel", "id": rid})
                except OSError:
                    pass

    def memory_bytes(self) -> int | None:
        """The worker's memory now: on macOS its unique set (what freeing it gives
        back; RSS counts shared libraries), elsewhere its resident set."""
        import psutil

        try:
            process = psutil.Process(self.pid)
            if sys.platform == "darwin":
                try:
                    return int(process.memory_full_info().uss)
                except (psutil.AccessDenied, AttributeError):
                    pass
            return int(process.memory_info().rss)
        except (psutil.Error, TypeError):
            return None

    def close(self, timeout: float = CLOSE_GRACE_S) -> None:
        """End the process: closing the channel tells it to go; killed if it has
        not gone within ``timeout``."""
        self._closing = True
        if self.channel is not None:
            self.channel.close()
        if self.proc is None:
            return
        if not self.exited.wait(timeout):
            log.warning("worker %d for %s did not exit in %.0f s: killing it", self.pid, self.name, timeout)
            self.proc.kill()
            self.exited.wait(timeout)

    # -- the process ending -------------------------------------------------------
    def _wait(self) -> None:
        code = self.proc.wait()
        self.reason = (f"killed by signal {-code}" if code < 0 else f"exited with status {code}")
        self.exited.set()
        if not self._closing:
            log.error("model %s stopped: its worker %d was %s", self.name, self.proc.pid, self.reason)
            if self.on_exit is not None:
                self.on_exit()

    def _died(self) -> WorkerDied:
        self.exited.wait(10.0)  # end-of-file comes first; the exit status a moment later
        return WorkerDied(self.name, self.reason or "its process ended")

    def _recv(self, timeout: float | None = None) -> dict[str, Any] | None:
        try:
            return self.channel.recv(timeout)
        except (EOFError, OSError, ValueError):
            raise self._died() from None

    def _send(self, message: Mapping[str, Any]) -> None:
        try:
            self.channel.send(message)
        except OSError:  # EPIPE: gone
            raise self._died() from None


def _error(message: Mapping[str, Any]) -> AnemllError:
    return AnemllError(message.get("message", "the worker failed"), message.get("hint", ""),
                       stage=message.get("stage", ""), code=message.get("code", "internal"))


# -- the worker process ------------------------------------------------------------------

class _Batch:
    """Tokens held for the next frame: the first of an answer goes at once,
    then at most one frame every ``interval`` seconds (the rest go with ``done``)."""

    def __init__(self, interval: float):
        self.interval = interval
        self.text, self.ids = "", []
        self.sent_at: float | None = None

    def add(self, text: str, ids: list[int]) -> bool:
        """Hold a token; True if a frame is due now."""
        self.text += text
        self.ids.extend(ids)
        now = time.monotonic()
        if self.sent_at is None or now - self.sent_at >= self.interval:
            self.sent_at = now
            return True
        return False

    def take(self) -> tuple[str, list[int]]:
        out, self.text, self.ids = (self.text, self.ids), "", []
        return out


def _serve(channel: Channel, load: Mapping[str, Any]) -> None:
    """Load the model, then run requests until the channel closes (the reader exits the process)."""
    from anemlld.residency import new_prefix_cache, run_request
    from anemlld.runtime.engine import Done, Engine

    requests: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
    cancels: dict[int, threading.Event] = {}

    def read() -> None:
        try:
            while True:
                message = channel.recv()
                if message.get("op") == "generate":
                    cancels[message["id"]] = threading.Event()
                    requests.put(message)
                elif message.get("op") == "cancel" and message.get("id") in cancels:
                    cancels[message["id"]].set()
        except (EOFError, OSError):
            pass
        # The daemon closed the channel (unload, stop) or is gone, however it went:
        # nothing here is worth saving, and waiting for a generation could take minutes.
        os._exit(0)

    threading.Thread(target=read, name="channel", daemon=True).start()
    if os.environ.get(CRASH_HOOK) == "load":
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        engine = Engine(load["path"], progress=lambda part, fraction: channel.send(
            {"ev": "progress", "part": part, "fraction": float(fraction)}))
    except AnemllError as e:
        channel.send({"ev": "load_failed", **e.to_dict()})
        return
    except Exception as e:  # a bug or a broken folder: say what it was, keep the traceback in the log
        log.exception("loading %s failed", load["path"])
        channel.send({"ev": "load_failed", "code": "model_failed", "stage": "load",
                      "message": f"{type(e).__name__}: {e}",
                      "hint": "see the daemon's log; re-convert the model if it persists"})
        return
    cache = new_prefix_cache(engine, load["cache_states"], load["cache_bytes"])
    channel.send({"ev": "loaded", "ctx": engine.ctx, "load_ms": engine.load_ms})
    interval = float(load.get("stream_interval", 0.0))
    while True:
        message = requests.get()
        rid = message["id"]
        batch = _Batch(interval)
        try:
            for event in run_request(engine, cache, prompt=message["prompt"], messages=message["messages"],
                                     options=message["options"], session_id=message["session_id"],
                                     cancel=cancels[rid], structure=message.get("structure")):
                if isinstance(event, Done):
                    if batch.ids or batch.text:
                        text, ids = batch.take()
                        channel.send({"ev": "tokens", "id": rid, "text": text, "token_ids": ids})
                    channel.send({"ev": "done", "id": rid, "text": event.text, "token_ids": event.token_ids,
                                  "stats": event.stats.as_dict(), "tool_calls": event.tool_calls})
                elif batch.add(event.text, event.token_ids):
                    text, ids = batch.take()
                    channel.send({"ev": "tokens", "id": rid, "text": text, "token_ids": ids})
        except AnemllError as e:
            channel.send({"ev": "error", "id": rid, **e.to_dict()})
        except Exception as e:
            log.exception("request %d on %s failed", rid, load["path"])
            channel.send({"ev": "error", "id": rid, "code": "internal", "stage": "", "message":
                          f"{type(e).__name__}: {e}", "hint": "this is a bug in anemlld; the daemon's log "
                          "has the details (look for the traceback)"})
        finally:
            cancels.pop(rid, None)


def main(argv: list[str] | None = None) -> int:
    rfd, wfd = (int(a) for a in (argv if argv is not None else sys.argv[1:]))
    # Ctrl-C in a terminal reaches the whole process group: the daemon stops its workers in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    channel = Channel(rfd, wfd)
    try:
        load = channel.recv()
    except EOFError:
        return 0
    logging.basicConfig(level=getattr(logging, str(load.get("log_level", "INFO")).upper(), logging.INFO),
                        format=f"%(asctime)s %(levelname)s worker[{os.getpid()}] %(name)s: %(message)s")
    for noisy in ("coremltools", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        _serve(channel, load)
    except (BrokenPipeError, EOFError):  # the daemon went away mid-answer
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
