"""One conversion in its own process: the daemon's handle on it
(:class:`ConversionProcess`) and what runs in it (``python -m
anemlld.convert.process``).

A conversion holds gigabytes for minutes and runs native code; in a child of
its own, the kernel's out-of-memory killer or a crash takes only the child,
and its memory goes back to the system when it ends. The daemon keeps no
torch and no coremltools.

Between the two, two pipes carrying msgpack maps (msgpack is self-delimiting:
no other framing), never pickle:

- daemon -> child (``--control``): ``{"spec": {src, out, options, attempt}}``
  first, later ``{"go": true}`` once the memory the plan asks for is there.
  Its end of file means the daemon is gone, however it went: the child
  exits at once (its finished parts stay for the resume).
- child -> daemon (``--events``): ``{"plan": {peak_bytes, chunks}}`` (then
  it waits for ``go``), ``{"progress": {stage, part, fraction, message}}``,
  ``{"log": {level, name, message}}``, and last ``{"done": {...}}`` or
  ``{"error": {code, stage, message, hint, kind}}``.

A child that ends without ``done`` or ``error`` died; the daemon decides what
then (anemlld/jobs.py). The child's stdout and stderr are the daemon's.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from anemlld.channel import Channel
from anemlld.convert import memory

log = logging.getLogger(__name__)

SAMPLE_SECONDS = 0.2  # how often the daemon reads the child's resident memory
# A test hook, for deterministic deaths: "STAGE[:PART PREFIX]:ATTEMPTS" makes
# the child SIGKILL itself at its first progress in that stage (and part) on
# attempts 1..ATTEMPTS, as the out-of-memory killer would.
DIE_ENV = "ANEMLLD_TEST_CHILD_DIES"
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


# -- the daemon's side ---------------------------------------------------------

class ConversionProcess:
    """A running conversion child: its frames, its pid, its memory.

    Not thread-safe: one caller (the jobs worker) polls it.
    """

    def __init__(self, src: Path, out: Path, options: dict[str, Any], attempt: int = 1):
        control_r, control_w = os.pipe()
        events_r, events_w = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "anemlld.convert.process", "--control", str(control_r),
                 "--events", str(events_w)],
                pass_fds=(control_r, events_w), stdin=subprocess.DEVNULL, env=env)
        except BaseException:
            os.close(control_w)
            os.close(events_r)
            raise
        finally:
            os.close(control_r)
            os.close(events_w)
        self._channel = Channel(events_r, control_w)
        self.pid = self.proc.pid
        self.stage = "inspect"
        self.rss = 0
        self.peak = 0
        self.stage_peaks: dict[str, int] = {}
        self._eof = False
        self._sampled = 0.0
        self.send({"spec": {"src": str(src), "out": str(out), "options": options, "attempt": attempt}})

    def send(self, message: dict[str, Any]) -> None:
        try:
            self._channel.send(message)
        except OSError:
            pass  # the child is gone; poll says so

    def poll(self, timeout: float) -> list[dict[str, Any]]:
        """The frames that arrive within ``timeout`` seconds, and any right behind them."""
        frames: list[dict[str, Any]] = []
        if not self._eof:
            try:
                frame = self._channel.recv(timeout)
                while frame is not None:
                    if isinstance(frame, dict):
                        frames.append(frame)
                    frame = self._channel.recv(0)
            except EOFError:
                self._eof = True
        else:
            time.sleep(min(timeout, 0.05))
        self._sample()
        for frame in frames:
            if isinstance(frame.get("progress"), dict):
                self._sample(force=True)  # the memory so far belongs to the stage that ends
                self.stage = str(frame["progress"].get("stage", self.stage))
        return frames

    @property
    def ended(self) -> bool:
        """The child closed its end and exited."""
        return self._eof and self.proc.poll() is not None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def _sample(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._sampled < SAMPLE_SECONDS:
            return
        self._sampled = now
        rss = memory.tree_rss(self.pid)
        if rss:
            self.rss = rss
            self.peak = max(self.peak, rss)
            self.stage_peaks[self.stage] = max(self.stage_peaks.get(self.stage, 0), rss)

    def stop(self, grace: float = 2.0) -> None:
        """End the child now (SIGTERM, then SIGKILL after ``grace``): every
        part it finished is on disk, the one it was making is not counted."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.close()

    def close(self) -> None:
        self._channel.close()
        if self.proc.poll() is None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# -- the child's side ----------------------------------------------------------

class _LogToDaemon(logging.Handler):
    def __init__(self, events: Channel):
        super().__init__()
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.events.send({"log": {"level": record.levelno, "name": record.name, "message": self.format(record)}})
        except Exception:
            self.handleError(record)


def _read_control(channel: Channel) -> dict[str, Any]:
    """The next control frame; exits the process when the daemon is gone."""
    while True:
        try:
            frame = channel.recv()
        except EOFError:
            os._exit(75)  # no daemon to report to; the job resumes from its parts at the next start
        if isinstance(frame, dict):
            return frame


def _die_hook(attempt: int):
    spec = os.environ.get(DIE_ENV, "")
    if not spec:
        return lambda stage, part: None
    *where, attempts = spec.split(":")
    stage, prefix = where[0], (where[1] if len(where) > 1 else "")

    def check(at_stage: str, part: str) -> None:
        if attempt <= int(attempts) and at_stage == stage and part.startswith(prefix):
            os.kill(os.getpid(), signal.SIGKILL)
    return check


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m anemlld.convert.process")
    ap.add_argument("--control", type=int, required=True)
    ap.add_argument("--events", type=int, required=True)
    ns = ap.parse_args(argv)
    events = Channel(ns.control, ns.events)  # sends are thread-safe: the quantizer's threads log too
    root = logging.getLogger()
    root.handlers[:] = [_LogToDaemon(events)]
    root.setLevel(logging.INFO)
    for noisy in ("coremltools", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    spec = _read_control(events)["spec"]
    go = threading.Event()

    def listen() -> None:  # after the spec, the control pipe only says go, or closes
        while True:
            if _read_control(events).get("go"):
                go.set()
    threading.Thread(target=listen, name="control", daemon=True).start()

    from anemlld.convert import pipeline  # torch and coremltools: the reason this process exists
    from shared.errors import AnemllError
    from shared.options import ConvertOptions

    die = _die_hook(int(spec.get("attempt", 1)))
    stage = "inspect"

    def progress(p: "pipeline.Progress") -> None:
        nonlocal stage
        stage = p.stage
        events.send({"progress": {"stage": p.stage, "part": p.part, "fraction": float(p.fraction),
                                  "message": p.message, "eta_seconds": p.eta_seconds}})
        die(p.stage, p.part)  # after the frame: a death in a stage, as the daemon sees a real one

    try:
        options = ConvertOptions(**spec["options"])
        src, out = Path(spec["src"]), Path(spec["out"])
        plan = pipeline.plan(src, options)
        plan.source.close()
        existing = pipeline.check_output(out.expanduser().resolve())
        if not (existing and existing.get("fingerprint") == plan.fingerprint):
            events.send({"plan": {"peak_bytes": memory.peak_estimate(plan), "chunks": plan.num_chunks}})
            go.wait()
        result = pipeline.convert(src, out, options, progress=progress)
        events.send({"done": {"reused": result.reused, "seconds": result.seconds}})
    except AnemllError as e:
        events.send({"error": {**e.to_dict(), "stage": e.stage or stage, "kind": "anemll"}})
    except Exception as e:
        events.send({"error": {"code": "internal", "stage": stage, "message": f"{type(e).__name__}: {e}",
                               "hint": "", "kind": "internal", "traceback": traceback.format_exc()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
