"""A conversion in a child process of its own (anemlld/convert/process.py),
so that the out-of-memory killer or a crash in native code takes only the
child and its memory goes back to the system. A child that dies is started
again, from its last finished part, up to ``ATTEMPTS`` times in all; then the
job fails naming the signal, the stage and the peak memory. Before its heavy
work the child reports its plan's peak memory estimate and waits until the
system has that much available. Stopping ends the child at once: the part it
was making is lost, the finished ones are kept for the resume."""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from anemlld import layout
from anemlld.convert import memory
from anemlld.convert.process import ConversionProcess
from anemlld.jobs.journal import Job
from shared.errors import AnemllError

log = logging.getLogger(__name__)

ATTEMPTS = 3  # a conversion child that dies is started again from its last finished part, twice
WAITING_FOR_MEMORY = "waiting for memory"
MEMORY_POLL_SECONDS = 2.0
OUT_OF_MEMORY_HINT = ("this looks like the system ran out of memory: close other programs, "
                      "or convert with more chunks (chunks = {chunks} in the [convert] table of the sidecar)")

Progress = Callable[[Any], None]  # the job's progress reporter: called with stage, part, fraction, message


class Stopped(BaseException):
    """Raised through the converter at a stage boundary when the daemon stops.
    A BaseException so that no ``except Exception`` on the way swallows it."""


class ConversionDied(AnemllError):
    """The conversion child ended without a result, ``ATTEMPTS`` times in a row."""

    code = "conversion_died"

    def __init__(self, message: str, hint: str, *, stage: str, signal_number: int | None, peak_bytes: int):
        super().__init__(message, hint, stage=stage)
        self.signal_number, self.peak_bytes = signal_number, peak_bytes

    def to_dict(self) -> dict:
        return {**super().to_dict(), "signal": self.signal_number, "peak_memory_bytes": self.peak_bytes}


class ChildConversions:
    """Runs jobs' conversions in children; ``pids`` maps a running job's id
    to its child."""

    def __init__(self, stopping: threading.Event, available_memory: Callable[[], int]):
        self.stopping = stopping
        self.available_memory = available_memory
        self.memory_poll_seconds = MEMORY_POLL_SECONDS
        self.pids: dict[int, int] = {}

    def convert(self, job: Job, out: Path, progress: Progress) -> None:
        """Run the conversion, again from its last finished part when the
        child dies, ``ATTEMPTS`` times in all; then record each stage's peak
        memory in the output's manifest. Raises what the converter raised,
        :class:`ConversionDied`, or :class:`Stopped`."""
        peaks: dict[str, int] = {}
        died: tuple[int | None, str, int, int] = (None, "", 0, 0)  # returncode, stage, peak, chunks
        for attempt in range(1, ATTEMPTS + 1):
            outcome, child, chunks = self._attempt(job, out, progress, attempt)
            for stage, peak in child.stage_peaks.items():
                peaks[stage] = max(peaks.get(stage, 0), peak)
            if outcome is not None:
                if isinstance(outcome, BaseException):
                    raise outcome
                if not outcome.get("reused"):
                    _record_peaks(out, peaks)
                return
            died = (child.returncode, progress.stage or child.stage, child.peak, chunks)
            log.warning("the conversion of %s (job %d, pid %d) %s during %s at %s of memory (attempt %d of %d)%s",
                        job.name, job.id, child.pid, _ending(died[0]), died[1], memory.gb(died[2]), attempt, ATTEMPTS,
                        "; starting again from its last finished part" if attempt < ATTEMPTS else "")
        returncode, stage, peak, chunks = died
        signum = -returncode if returncode is not None and returncode < 0 else None
        hint = OUT_OF_MEMORY_HINT.format(chunks=max(2, 2 * chunks)) if signum == signal.SIGKILL else \
            "the converter crashed: the daemon's log has what it said before it died"
        raise ConversionDied(f"the conversion process {_ending(returncode)} during {stage} at {memory.gb(peak)} "
                             f"of memory, {ATTEMPTS} times in a row", hint, stage=stage, signal_number=signum,
                             peak_bytes=max(peaks.values(), default=peak))

    def _attempt(self, job: Job, out: Path, progress: Progress,
                 attempt: int) -> tuple[dict | BaseException | None, ConversionProcess, int]:
        """One child, from start to end: (its ``done`` frame, or the error it
        reported, or None if it died; the child; the plan's chunks)."""
        child = ConversionProcess(Path(job.origin), out, job.options, attempt)
        self.pids[job.id] = child.pid
        chunks = 0
        try:
            while not child.ended:
                if self.stopping.is_set():
                    raise Stopped()
                for frame in child.poll(0.25):
                    if "progress" in frame:
                        progress(SimpleNamespace(**frame["progress"]))
                    elif "plan" in frame:
                        chunks = int(frame["plan"].get("chunks", 0))
                        self._wait_for_memory(job, child, int(frame["plan"]["peak_bytes"]), progress)
                        child.send({"go": True})
                    elif "log" in frame:
                        record = frame["log"]
                        logging.getLogger(str(record.get("name", "anemlld.convert"))).log(
                            int(record.get("level", logging.INFO)), "[pid %d] %s", child.pid, record.get("message"))
                    elif "done" in frame:
                        return frame["done"], child, chunks
                    elif "error" in frame:
                        return _child_error(frame["error"], job.name), child, chunks
            return None, child, chunks
        finally:
            self.pids.pop(job.id, None)
            child.stop()

    def _wait_for_memory(self, job: Job, child: ConversionProcess, peak_bytes: int, progress: Progress) -> None:
        """Hold the child before its heavy work while the system has less
        memory available than the plan's peak (less what the child already
        holds); say so in the job's stage. Polls; stops with the daemon."""
        said = False
        while True:
            need = max(0, peak_bytes - child.rss)
            have = self.available_memory()
            if have >= need:
                if said:
                    log.info("%s: %s available now; converting", job.name, memory.gb(have))
                return
            if not said:
                log.info("%s waits for memory: the conversion needs about %s more, %s is available",
                         job.name, memory.gb(need), memory.gb(have))
            said = True
            progress(SimpleNamespace(stage=WAITING_FOR_MEMORY, part=f"needs {memory.gb(need)}, {memory.gb(have)} available",
                                     fraction=progress.job.fraction,
                                     message=f"waiting for memory: the conversion needs about {memory.gb(need)}, "
                                             f"{memory.gb(have)} is available; it starts when memory frees"))
            deadline = time.monotonic() + self.memory_poll_seconds
            while time.monotonic() < deadline:
                if self.stopping.is_set():
                    raise Stopped()
                if child.ended:
                    return  # died while waiting: the caller sees it
                child.poll(min(0.25, self.memory_poll_seconds))


def _ending(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "an unknown signal"
        return f"was killed by signal {-returncode} ({name})"
    return f"exited with status {returncode} before it finished"


def _child_error(error: dict[str, Any], name: str) -> AnemllError:
    """What the child reported, as the error this process would have raised."""
    if error.get("kind") == "internal":
        log.error("converting %s failed unexpectedly in its child process:\n%s", name, error.get("traceback", ""))
        return AnemllError(str(error.get("message")), "this looks like a bug in anemlld; the daemon's log has the "
                           "details", stage=str(error.get("stage", "")), code="internal")
    return AnemllError(str(error.get("message")), str(error.get("hint", "")), stage=str(error.get("stage", "")),
                       code=str(error.get("code") or "error"))


def _record_peaks(out: Path, peaks: dict[str, int]) -> None:
    """Each stage's peak resident memory into the published output's
    manifest (written by the child, which cannot measure its own death)."""
    path = out / layout.MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
        manifest["stage_peak_rss_bytes"] = dict(sorted(peaks.items()))
        manifest["peak_rss_bytes"] = max(peaks.values(), default=0)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, path)
    except (OSError, ValueError, AttributeError, TypeError) as e:
        log.warning("cannot record the memory peaks in %s: %s", path, e)
