"""Conversion jobs: the journal of every input the daemon was given, the one
worker that converts them one at a time in submission order, and what becomes
of an input afterwards: a published model, or the failed folder with
``error.json`` (never re-queued by itself; ``retry`` queues it again).

The journal is SQLite in WAL mode at ``settings.journal_path``, one row per
job (schema below). It is what makes a kill -9 at any moment harmless, by the
order of its writes:

1. A job row is committed ``queued`` before the model is announced or any
   work starts. An input the journal never heard of is still in the drop
   folder, and the watcher reports it again after a restart.
2. The converter builds in a hidden ``.NAME.partial`` folder and renames it
   into place only when complete, so the models folder never shows a partial
   model; the row becomes ``done`` only after that rename. A crash in between
   leaves the row ``running``: ``start`` runs it again and the converter,
   finding a finished output with the same fingerprint, returns at once.
   A crash mid-conversion resumes from the last finished part.
3. A failure commits ``failed`` (with the failed-folder path chosen) before
   moving the input there; a retry commits its new ``queued`` row before
   moving the input back. ``start`` completes a move a crash interrupted.
4. Submissions are deduplicated by fingerprint (input files' names, sizes and
   mtimes, the sidecar's bytes, the served name and options) under one lock:
   an input with a queued, running, failed, or done job (whose output still
   exists) is not queued again by the watcher. ``retry`` and the ``convert``
   op are explicit requests and skip only the queued, running and done ones.

Each conversion runs in a child process of its own
(anemlld/convert/process.py), so that the out-of-memory killer or a crash in
native code takes only the child and its memory goes back to the system.
A child that dies is started again, from its last finished part, up to
``ATTEMPTS`` times in all; then the job fails naming the signal, the stage and
the peak memory. Before its heavy work the child reports its plan's peak
memory estimate and waits until the system has that much available. Stopping
ends the child at once: the part it was making is lost, the finished ones
are kept for the resume.

An input submitted from the drop folder moves to the failed folder when it
fails. One given by path (the ``convert`` op) elsewhere stays where it is, and
its ``error.json`` goes to ``FAILED/<folder name>.error.json``.
"""
from __future__ import annotations

import collections
import datetime
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from anemlld import layout
from anemlld.convert import memory
from anemlld.convert.process import ConversionProcess
from anemlld.listeners import Listeners
from anemlld.registry import Registry
from shared.errors import AnemllError, BadInput
from shared.options import ConvertOptions
from shared.settings import Settings
from shared.sidecar import BESIDE_SUFFIX, INSIDE, NAME_FORM, NAME_RE, default_name, find_sidecar, load_sidecar

log = logging.getLogger(__name__)

STATES = ("queued", "running", "done", "failed")
UNFINISHED = ("queued", "running")
PROGRESS_INTERVAL = 0.5  # seconds between journal writes of one job's progress (stage changes always go)
ATTEMPTS = 3  # a conversion child that dies is started again from its last finished part, twice
WAITING_FOR_MEMORY = "waiting for memory"
MEMORY_POLL_SECONDS = 2.0
ERROR_FILE = "error.json"
FINGERPRINT_VERSION = "jobs-1"

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL,              -- the served name
    kind        TEXT NOT NULL,              -- convert, or register (a folder already converted: no work)
    source      TEXT NOT NULL,              -- where the input is now (the failed folder after a failure)
    origin      TEXT NOT NULL,              -- where it was submitted from; a retry puts it back there
    failed_path TEXT,                       -- where a failure moved it; for a retry, where it comes back from
    fingerprint TEXT NOT NULL,              -- of the inputs: files, sidecar bytes, name, options
    options     TEXT NOT NULL DEFAULT '{}', -- json, ConvertOptions.to_mapping()
    serve       TEXT NOT NULL DEFAULT '{}', -- json: pin, keep_alive (seconds; -1 forever; null the default)
    overrides   TEXT NOT NULL DEFAULT '{}', -- json: name and options given with the convert op
    state       TEXT NOT NULL,              -- queued, running, done, failed
    stage       TEXT NOT NULL DEFAULT '',
    part        TEXT NOT NULL DEFAULT '',
    fraction    REAL NOT NULL DEFAULT 0,
    error       TEXT,                       -- json: code, stage, message, hint
    output      TEXT,                       -- the converted folder, once done
    created_at  REAL NOT NULL,              -- Unix seconds
    updated_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_fingerprint ON jobs (fingerprint);
"""

ConvertFn = Callable[..., Any]  # pipeline.convert(src_dir, out_dir, options, progress=fn)
ProgressListener = Callable[[dict[str, Any]], None]
OUT_OF_MEMORY_HINT = ("this looks like the system ran out of memory: close other programs, "
                      "or convert with more chunks (chunks = {chunks} in the [convert] table of the sidecar)")


@dataclass(frozen=True)
class Job:
    """One row of the journal."""

    id: int
    name: str
    kind: str
    source: str
    origin: str
    failed_path: str | None
    fingerprint: str
    options: dict[str, Any]
    serve: dict[str, Any]
    overrides: dict[str, Any]
    state: str
    stage: str
    part: str
    fraction: float
    error: dict[str, Any] | None
    output: str | None
    created_at: float
    updated_at: float
    pid: int | None = None  # of the conversion child running it; not journaled (no child outlives the daemon)

    @classmethod
    def from_row(cls, row: sqlite3.Row, pid: int | None = None) -> "Job":
        values = dict(row)
        for key in ("options", "serve", "overrides", "error"):
            values[key] = json.loads(values[key]) if values[key] else ({} if key != "error" else None)
        return cls(**values, pid=pid)

    def to_wire(self) -> dict[str, Any]:
        """The record as the ``jobs`` op sends it (docs/protocol.md)."""
        return {"job": self.id, "name": self.name, "source": self.source, "state": self.state,
                "stage": self.stage, "part": self.part, "fraction": self.fraction, "pid": self.pid,
                "created_at": self.created_at, "updated_at": self.updated_at, "error": self.error}

    @property
    def public_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.options.items() if k in ConvertOptions.KEYS}

    @property
    def pin(self) -> bool:
        return bool(self.serve.get("pin", False))

    @property
    def keep_alive(self) -> float | None:
        value = self.serve.get("keep_alive")
        return math.inf if value == -1 else value


@dataclass(frozen=True)
class _Input:
    """What a folder asks for: read from it and its sidecar before any row is written."""

    name: str
    fingerprint: str
    converted: bool  # holds meta.yaml: register, do not convert
    options: dict[str, Any]
    serve: dict[str, Any]
    error: AnemllError | None = None  # a bad sidecar: the job fails at once


class _Stopped(BaseException):
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


# -- inputs -------------------------------------------------------------------

def input_files(folder: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of the files that make up an input:
    everything but hidden files, the inside sidecar (counted by its bytes)
    and our own error.json."""
    out = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel in (INSIDE, ERROR_FILE):
                continue
            try:
                st = os.stat(path)
            except OSError:
                continue
            out.append((rel, st.st_size, 0 if layout.rewritten_on_load(rel) else st.st_mtime_ns))
    return sorted(out)


def input_fingerprint(folder: Path, *parts: str) -> str:
    """Cheap identity of an input (no file contents read but the sidecar's):
    its files and ``parts`` (name, options, sidecar bytes)."""
    h = hashlib.sha256(FINGERPRINT_VERSION.encode())
    for part in parts:
        h.update(b"\0" + part.encode())
    for rel, size, mtime in input_files(folder):
        h.update(f"\0{rel}:{size}:{mtime}".encode())
    return h.hexdigest()




def _keep_alive_json(seconds: float | None) -> float | None:
    return -1 if seconds is not None and math.isinf(seconds) else seconds


def _beside(folder: Path) -> Path:
    return folder.parent / f"{folder.name}{BESIDE_SUFFIX}"


# -- the jobs -----------------------------------------------------------------

class Jobs:
    """The journal and its one worker thread.

    Progress listeners (``on_progress``, settable as an attribute, and any
    added with ``subscribe``) are called from the worker thread with the job's
    ``jobs``-op record plus ``message``, when a job starts, ends or fails and,
    throttled, as it progresses.
    """

    def __init__(self, settings: Settings, registry: Registry, convert: ConvertFn | None = None,
                 on_progress: ProgressListener | None = None,
                 available_memory: Callable[[], int] = memory.available):
        """``convert``: a converter to call in this process (tests); by
        default every conversion runs in a child process of its own.
        ``available_memory``: bytes the system can give a conversion now."""
        self.settings = settings
        self.registry = registry
        self.on_progress = on_progress
        self._convert = convert
        self._available_memory = available_memory
        self.memory_poll_seconds = MEMORY_POLL_SECONDS
        self._pids: dict[int, int] = {}  # job id -> its conversion child
        self._listeners: Listeners[ProgressListener] = Listeners()
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._queue: collections.deque[int] = collections.deque()
        self._current: int | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        Path(settings.state_dir).mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(settings.journal_path), timeout=30, check_same_thread=False,
                                   isolation_level=None)  # autocommit: every statement commits at once
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    # -- life cycle ---------------------------------------------------------

    def start(self) -> None:
        """Finish what a crash interrupted, announce known models to the
        registry, queue unfinished jobs in order, start the worker. Call it
        before the watcher starts reporting."""
        if self._thread is not None:
            return
        self._stopping.clear()
        with self._lock:
            self._repair_inputs()
            self._db.execute("UPDATE jobs SET state = 'queued', updated_at = ? WHERE state = 'running'",
                             (time.time(),))
            self._restore_registry()
            for (job_id,) in self._db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY id"):
                self._enqueue(job_id)
            pending = len(self._queue)
        if pending:
            log.info("resuming %d unfinished job(s)", pending)
        self._thread = threading.Thread(target=self._run, name="anemlld-jobs", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the worker at the current conversion's next stage boundary,
        waiting at most ``timeout``. True if it stopped; if not, it is a daemon
        thread that dies with the process, and the job resumes at next start."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.info("the current conversion did not reach a stage boundary in %.1fs; "
                         "it resumes at the next start", timeout)
                return False
        return True

    def close(self) -> None:
        """Close the journal (after ``stop``, once nothing submits any more)."""
        with self._lock:
            self._db.close()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued or running in this process."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._current is not None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    # -- requests -----------------------------------------------------------

    def submit(self, source: Path) -> int | None:
        """Queue the folder ``source`` (the watcher's call). Returns the new
        job's id, or None when nothing was queued: the same input already has
        a job, or the folder is gone. A bad sidecar makes a failed job at once."""
        folder = Path(os.path.abspath(Path(source).expanduser()))
        if not folder.is_dir():
            log.debug("%s is gone; nothing to queue", folder)
            return None
        job, created = self._submit(folder, folder, {}, explicit=False)
        return job.id if created else None

    def convert_path(self, path: str | Path, name: str | None = None,
                     options: dict[str, Any] | None = None) -> dict[str, Any]:
        """Queue an arbitrary folder (the ``convert`` op); ``name`` and
        ``options`` override its sidecar. Returns the job record: the new job,
        or the one already queued, running or done for the same input."""
        folder = Path(os.path.abspath(Path(path).expanduser()))
        if not folder.exists():
            raise AnemllError(f"{folder} does not exist", "give the absolute path of a Hugging Face model "
                              "folder on the daemon's machine", code="not_found")
        if not folder.is_dir():
            raise AnemllError(f"{folder} is not a folder", "give the Hugging Face model folder itself",
                              code="bad_request")
        if name is not None and not NAME_RE.fullmatch(name):
            raise AnemllError(f"name {name!r} is not a usable model name", f"use {NAME_FORM}", code="bad_request")
        if options:
            try:
                ConvertOptions.from_mapping(options, where="options")
            except BadInput as e:
                raise AnemllError(e.message, e.hint, code="bad_request") from None
        overrides = {k: v for k, v in (("name", name), ("options", options)) if v}
        job, _ = self._submit(folder, folder, overrides, explicit=True)
        return job.to_wire()

    def retry(self, name: str) -> dict[str, Any]:
        """Queue the failed model ``name`` again. Its input goes back where it
        was submitted from (the drop folder, for dropped folders) and is read
        afresh there, sidecar included, so fixing it in the failed folder is
        enough. Returns the new job record."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE name = ? ORDER BY id DESC LIMIT 1", (name,)).fetchone()
            if row is None:
                known = sorted({r[0] for r in self._db.execute("SELECT name FROM jobs WHERE state = 'failed'")})
                raise AnemllError(f"no model named {name!r} has failed",
                                  f"failed models: {', '.join(known)}" if known else "no model has failed",
                                  code="not_found")
            job = Job.from_row(row)
            if job.state != "failed":
                raise AnemllError(f"{name} has not failed: its latest job is {job.state}",
                                  "retry is for failed models; see the jobs list", code="bad_request")
            origin = Path(job.origin)
            failed = Path(job.failed_path) if job.failed_path else None
            if failed is not None and failed.exists():
                if origin.exists():
                    raise AnemllError(f"cannot put {name} back: {origin} already exists",
                                      f"remove or rename {origin}, or move {failed} there yourself and retry",
                                      code="bad_request")
                where = failed
            elif origin.exists():
                where, failed = origin, None
            else:
                raise AnemllError(f"the input of {name} is gone: {failed or origin} does not exist",
                                  f"copy the model folder into {self.settings.drop_dir} again", code="not_found")
            new, _ = self._submit(where, origin, job.overrides, explicit=True, coming_back_from=failed)
        if new.name != name:  # the fixed sidecar names it differently
            self.registry.remove(name)
        log.info("retrying %s as job %d", name, new.id)
        return new.to_wire()

    def subscribe(self, listener: ProgressListener) -> Callable[[], None]:
        """Add a progress listener; returns the function that removes it."""
        return self._listeners.add(listener)

    def list(self) -> list[dict[str, Any]]:
        """Every job, in queue order, shaped as the ``jobs`` op sends them."""
        return [job.to_wire() for job in self.jobs()]

    def jobs(self) -> list[Job]:
        with self._lock:
            return [Job.from_row(r, self._pids.get(r["id"])) for r in self._db.execute("SELECT * FROM jobs ORDER BY id")]

    def get(self, job_id: int) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_row(row, self._pids.get(job_id)) if row else None

    # -- submitting ---------------------------------------------------------

    def _describe(self, where: Path, origin: Path, overrides: dict[str, Any]) -> _Input:
        """Read the input at ``where`` (which belongs at ``origin``)."""
        fallback = overrides.get("name") or default_name(origin)
        raw = b""
        try:
            path = find_sidecar(where)
            raw = path.read_bytes() if path else b""
            sidecar = load_sidecar(where)
        except (AnemllError, OSError) as e:
            error = e if isinstance(e, AnemllError) else BadInput(
                f"cannot read the sidecar of {origin.name}: {e}", "check that the file is readable", stage="sidecar")
            error.stage = error.stage or "sidecar"
            fp = input_fingerprint(where, "error", fallback, hashlib.sha256(raw).hexdigest())
            return _Input(fallback, fp, False, {}, {}, error)
        name = overrides.get("name") or sidecar.name
        if where.name != origin.name and name == default_name(where):
            name = default_name(origin)  # read from a renamed failed-folder copy: the name is the original's
        options = sidecar.convert
        if overrides.get("options"):
            merged = {k: v for k, v in options.to_mapping().items() if k in ConvertOptions.KEYS}
            merged.update(overrides["options"])
            try:
                options = ConvertOptions.from_mapping(merged, where="options")
            except BadInput as e:
                raise AnemllError(f"{e.message} (with the sidecar's options)", e.hint, code="bad_request") from None
        serve = {"pin": sidecar.pin, "keep_alive": _keep_alive_json(sidecar.keep_alive_seconds)}
        converted = (where / layout.META_FILE).is_file()
        mapping = {} if converted else options.to_mapping()  # a converted folder's options are in it
        fp = input_fingerprint(where, "register" if converted else "convert", name,
                               json.dumps(mapping, sort_keys=True), hashlib.sha256(raw).hexdigest())
        return _Input(name, fp, converted, mapping, serve)

    def _submit(self, where: Path, origin: Path, overrides: dict[str, Any], *, explicit: bool,
                coming_back_from: Path | None = None) -> tuple[Job, bool]:
        """Write the job for the input at ``where`` (belonging at ``origin``);
        returns (job, created). ``coming_back_from``: a retry's failed-folder copy."""
        info = self._describe(where, origin, overrides)
        with self._lock:
            same = self._same_input(info.fingerprint, include_failed=not explicit)
            if same is not None:
                log.info("%s: same input as job %d (%s); not queued again", origin.name, same.id, same.state)
                return same, False
            problem = info.error or (self._check_converted(where) if info.converted else None)
            if problem is not None:
                job = self._fail_at_submit(origin, coming_back_from, info, overrides, problem)
            else:
                job = self._insert(info, "register" if info.converted else "convert", origin, coming_back_from,
                                   overrides, state="done" if info.converted else "queued")
                self._place(job)
        # Announced once the journal is written, outside the lock (a retry holds it across this call).
        if job.state == "failed":
            self.registry.upsert(job.name, state="failed", source=job.source, options=job.public_options,
                                 error=job.error)
        elif job.state == "done":
            self._announce_registered(job)
        else:
            self.registry.upsert(job.name, state="queued", source=job.origin, options=job.public_options,
                                 error=None, pin=job.pin, keep_alive=job.keep_alive)
            self._enqueue(job.id)
            log.info("queued %s as job %d (%s)", job.name, job.id, origin)
        return job, True

    def _same_input(self, fingerprint: str, include_failed: bool) -> Job | None:
        rows = self._db.execute("SELECT * FROM jobs WHERE fingerprint = ? ORDER BY id DESC", (fingerprint,))
        for job in map(Job.from_row, rows):
            if job.state in UNFINISHED or (job.state == "failed" and include_failed):
                return job
            if job.state == "done" and job.output and (Path(job.output) / layout.META_FILE).is_file():
                return job
        return None

    def _insert(self, info: _Input, kind: str, origin: Path, failed_path: Path | None,
                overrides: dict[str, Any], state: str = "queued", error: dict | None = None) -> Job:
        now = time.time()
        source = failed_path if state == "failed" and failed_path else origin
        done = state == "done"  # a converted folder, registered where it is
        cur = self._db.execute(
            "INSERT INTO jobs (name, kind, source, origin, failed_path, fingerprint, options, serve, overrides,"
            " state, stage, fraction, error, output, created_at, updated_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (info.name, kind, str(source), str(origin), str(failed_path) if failed_path else None, info.fingerprint,
             json.dumps(info.options), json.dumps(info.serve), json.dumps(overrides), state,
             "done" if done else (error or {}).get("stage", ""), 1.0 if done else 0.0,
             json.dumps(error) if error else None, str(origin) if done else None, now, now))
        return self.get(cur.lastrowid)

    def _fail_at_submit(self, origin: Path, coming_back_from: Path | None, info: _Input,
                        overrides: dict[str, Any], problem: AnemllError) -> Job:
        """A bad sidecar or a broken converted folder: the job is failed from
        the start and the input moves to the failed folder."""
        failed = coming_back_from or self._failed_home(origin)
        error = self._error(problem, "register" if info.converted else "sidecar", info.name, failed or origin)
        job = self._insert(info, "register" if info.converted else "convert", origin, failed, overrides,
                           state="failed", error=error)
        log.warning("%s failed at %s: %s", info.name, error["stage"], error["message"])
        self._place(job)
        return job

    @staticmethod
    def _check_converted(folder: Path) -> AnemllError | None:
        """A folder that already holds converted parts must name parts that are there."""
        try:
            lay = layout.read_meta(folder)
            lay.parts()
        except AnemllError as e:
            e.stage = "register"
            return e
        return None

    def _announce_registered(self, job: Job) -> None:
        folder = Path(job.origin)
        options = job.public_options or self._manifest_options(folder)
        self.registry.upsert(job.name, state="ready", source=job.origin, path=job.output, options=options,
                             size_bytes=layout.folder_size(folder), error=None, pin=job.pin, keep_alive=job.keep_alive)
        log.info("registered the converted model %s in %s (job %d)", job.name, folder, job.id)

    @staticmethod
    def _manifest_options(folder: Path) -> dict[str, Any]:
        """A converted folder's options: from our manifest, else what meta.yaml says."""
        try:
            options = json.loads((folder / layout.MANIFEST_FILE).read_text())["options"]
            return {k: v for k, v in options.items() if k in ConvertOptions.KEYS}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        try:
            lay = layout.read_meta(folder)
            return {"context_length": lay.context_length, "batch_size": lay.batch_size}
        except AnemllError:
            return {}

    # -- the worker ---------------------------------------------------------

    def _enqueue(self, job_id: int) -> None:
        with self._cond:
            if job_id not in self._queue and job_id != self._current:
                self._queue.append(job_id)
                self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping.is_set():
                    self._cond.wait()
                if self._stopping.is_set():
                    return
                self._current = self._queue.popleft()
            try:
                self._work(self._current)
            except _Stopped:
                log.info("job %s stopped at a stage boundary; it resumes at the next start", self._current)
                return
            except Exception:
                log.exception("job %s: the worker failed; the job resumes at the next start", self._current)
            finally:
                with self._cond:
                    self._current = None
                    self._cond.notify_all()

    def _work(self, job_id: int) -> None:
        job = self.get(job_id)
        if job is None or job.state not in UNFINISHED:
            return
        self._place(job)
        out = Path(self.settings.models_dir) / job.name
        job = self._update(job.id, state="running", stage="", part="", fraction=0.0, error=None)
        self.registry.upsert(job.name, state="converting", source=job.origin, options=job.public_options,
                             error=None, pin=job.pin, keep_alive=job.keep_alive)
        self._emit(job, "started")
        log.info("converting %s (job %d) from %s", job.name, job.id, job.origin)
        progress = _ProgressReporter(self, job)
        try:
            if self._convert is not None:
                self._convert(Path(job.origin), out, ConvertOptions(**job.options), progress=progress)
            else:
                self._convert_in_child(job, out, progress)
        except _Stopped:
            raise
        except Exception as e:
            if not isinstance(e, AnemllError):
                log.exception("converting %s failed unexpectedly", job.name)
            self._fail(job, e, progress.stage)
            return
        size = layout.folder_size(out)
        job = self._update(job.id, state="done", stage="done", part="", fraction=1.0, output=str(out))
        self.registry.upsert(job.name, state="ready", source=job.origin, path=str(out), options=job.public_options,
                             size_bytes=size, error=None, pin=job.pin, keep_alive=job.keep_alive)
        self._emit(job, "done")
        log.info("%s is ready: %s (%.1f MB)", job.name, out, size / 2**20)

    # -- the conversion child -----------------------------------------------

    def _convert_in_child(self, job: Job, out: Path, progress: "_ProgressReporter") -> None:
        """Run the conversion in a child process, again from its last finished
        part when the child dies, ``ATTEMPTS`` times in all; then record each
        stage's peak memory in the output's manifest. Raises what the
        converter raised, :class:`ConversionDied`, or :class:`_Stopped`."""
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

    def _attempt(self, job: Job, out: Path, progress: "_ProgressReporter",
                 attempt: int) -> tuple[dict | BaseException | None, ConversionProcess, int]:
        """One child, from start to end: (its ``done`` frame, or the error it
        reported, or None if it died; the child; the plan's chunks)."""
        child = ConversionProcess(Path(job.origin), out, job.options, attempt)
        self._pids[job.id] = child.pid
        chunks = 0
        try:
            while not child.ended:
                if self._stopping.is_set():
                    raise _Stopped()
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
            self._pids.pop(job.id, None)
            child.stop()

    def _wait_for_memory(self, job: Job, child: ConversionProcess, peak_bytes: int,
                         progress: "_ProgressReporter") -> None:
        """Hold the child before its heavy work while the system has less
        memory available than the plan's peak (less what the child already
        holds); say so in the job's stage. Polls; stops with the daemon."""
        said = False
        while True:
            need = max(0, peak_bytes - child.rss)
            have = self._available_memory()
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
                if self._stopping.is_set():
                    raise _Stopped()
                if child.ended:
                    return  # died while waiting: the caller sees it
                child.poll(min(0.25, self.memory_poll_seconds))

    def _fail(self, job: Job, e: BaseException, stage: str) -> Job:
        """Journal first, then move the input, then announce."""
        with self._lock:
            origin = Path(job.origin)
            failed = self._failed_home(origin) if origin.exists() else None
            error = self._error(e, stage, job.name, failed or origin)
            job = self._update(job.id, state="failed", stage=error["stage"], error=json.dumps(error),
                               failed_path=str(failed) if failed else None, source=str(failed or origin))
            self._place(job)
        log.warning("%s failed at %s: %s", job.name, error["stage"], error["message"])
        self.registry.upsert(job.name, state="failed", source=job.source, error=error)
        self._emit(job, error["message"])
        return job

    def _error(self, e: BaseException, stage: str, name: str, where: Path) -> dict[str, Any]:
        """code, stage, message, hint; the hint ends with what to do to retry."""
        if isinstance(e, AnemllError):
            error = e.to_dict()
            error["stage"] = error["stage"] or stage
            hint = e.hint
        else:
            error = {"code": "internal", "stage": stage, "message": f"{type(e).__name__}: {e}"}
            hint = "this looks like a bug in anemlld; the daemon's log has the details"
        moved = Path(where).parent == Path(self.settings.failed_dir)
        fix = f"the input is {'now ' if moved else ''}in {where}: fix it there, then run: anemll-chat --retry {name}"
        error["hint"] = f"{hint.rstrip('. ')}. {fix[0].upper()}{fix[1:]}" if hint else fix[0].upper() + fix[1:]
        return error

    # -- inputs on disk -----------------------------------------------------

    def _in_drop(self, folder: Path) -> bool:
        return folder.parent.resolve() == Path(self.settings.drop_dir).resolve()

    def _failed_home(self, origin: Path) -> Path | None:
        """Where a failed input from the drop folder goes: FAILED/<its name>,
        or <its name>-2, -3... if taken. None for inputs from elsewhere."""
        if not self._in_drop(origin):
            return None
        failed_dir = Path(self.settings.failed_dir)
        for i in range(1, 10_000):
            home = failed_dir / (origin.name if i == 1 else f"{origin.name}-{i}")
            if not os.path.lexists(home) and not os.path.lexists(_beside(home)):
                return home
        raise AnemllError(f"the failed folder {failed_dir} is full of {origin.name} copies",
                          "empty the failed folder", stage="failed")

    def _place(self, job: Job, repairing: bool = False) -> None:
        """Put the input where the job's state says it belongs (idempotent, so
        ``start`` can finish a move a crash interrupted): a failed one in the
        failed folder with its error.json, any other at its origin."""
        origin = Path(job.origin)
        failed = Path(job.failed_path) if job.failed_path else None
        if job.state == "failed":
            if repairing and self._has_error_file(origin):
                return  # our error.json is in it: moved back by its owner, not left behind by a crash
            if failed is not None:
                self._move(origin, failed)
            self._write_error_file(job)
        elif failed is not None:
            self._move(failed, origin)
            self._remove_error_file(origin)

    def _move(self, src: Path, dst: Path) -> None:
        for a, b in ((src, dst), (_beside(src), _beside(dst))):
            if os.path.lexists(a) and not os.path.lexists(b):
                b.parent.mkdir(parents=True, exist_ok=True)
                try:
                    shutil.move(str(a), str(b))
                except OSError as e:
                    log.error("cannot move %s to %s: %s", a, b, e)
                else:
                    log.info("moved %s to %s", a, b)

    def _error_path(self, job: Job) -> Path:
        failed = Path(job.failed_path) if job.failed_path else None
        if failed is not None and failed.is_dir():
            return failed / ERROR_FILE
        return Path(self.settings.failed_dir) / f"{Path(job.origin).name}.{ERROR_FILE}"

    def _write_error_file(self, job: Job) -> None:
        error = job.error or {}
        doc = {**error, "name": job.name, "job": job.id, "input": job.source, "origin": job.origin,
               "retry": f"anemll-chat --retry {job.name}",
               "failed_at": datetime.datetime.fromtimestamp(job.updated_at).astimezone().isoformat(timespec="seconds")}
        path = self._error_path(job)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        except OSError as e:
            log.error("cannot write %s: %s", path, e)

    @staticmethod
    def _has_error_file(folder: Path) -> bool:
        try:
            return "retry" in json.loads((folder / ERROR_FILE).read_text(encoding="utf-8"))  # ours, not the model's
        except (OSError, ValueError, TypeError):
            return False

    def _remove_error_file(self, folder: Path) -> None:
        if self._has_error_file(folder):
            try:
                (folder / ERROR_FILE).unlink()
            except OSError as e:
                log.warning("cannot remove %s: %s", folder / ERROR_FILE, e)

    # -- journal ------------------------------------------------------------

    def _update(self, job_id: int, **fields: Any) -> Job:
        fields["updated_at"] = time.time()
        columns = ", ".join(f"{k} = ?" for k in fields)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {columns} WHERE id = ?", (*fields.values(), job_id))
            return self.get(job_id)

    def _repair_inputs(self) -> None:
        """The newest job of each input decides where that input belongs."""
        rows = self._db.execute("SELECT * FROM jobs WHERE id IN (SELECT MAX(id) FROM jobs GROUP BY origin)"
                                " AND (failed_path IS NOT NULL OR state = 'failed') ORDER BY id")
        for job in map(Job.from_row, rows.fetchall()):
            self._place(job, repairing=True)

    def _restore_registry(self) -> None:
        """What the registry shows after a restart: the newest job of each
        input, and of those the newest for each name (a retry may rename)."""
        by_origin: dict[str, Job] = {}
        for job in self.jobs():
            by_origin[job.origin] = job
        latest: dict[str, Job] = {}
        for job in sorted(by_origin.values(), key=lambda j: j.id):
            latest[job.name] = job
        for job in latest.values():
            if job.state in UNFINISHED:
                self.registry.upsert(job.name, state="queued", source=job.origin, options=job.public_options,
                                     pin=job.pin, keep_alive=job.keep_alive)
            elif job.state == "failed":
                self.registry.upsert(job.name, state="failed", source=job.source, options=job.public_options,
                                     error=job.error)
            elif job.output and (Path(job.output) / layout.META_FILE).is_file():
                self.registry.upsert(job.name, state="ready", source=job.origin, path=job.output,
                                     options=job.public_options or self._manifest_options(Path(job.output)),
                                     size_bytes=layout.folder_size(Path(job.output)), pin=job.pin, keep_alive=job.keep_alive)
            else:
                log.warning("%s was converted to %s, which is gone; drop its folder again to convert it",
                            job.name, job.output)

    def _emit(self, job: Job, message: str = "") -> None:
        with self._lock:
            listeners = [self.on_progress, *self._listeners.snapshot()] if self.on_progress \
                else self._listeners.snapshot()
        record = {**job.to_wire(), "message": message}
        for listener in listeners:
            try:
                listener(dict(record))
            except Exception:
                log.exception("a progress listener failed")


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


class _ProgressReporter:
    """The converter's progress callback for one job: journal and listener,
    throttled; at a stage boundary after ``stop``, raises :class:`_Stopped`."""

    def __init__(self, jobs: Jobs, job: Job):
        self.jobs, self.job = jobs, job
        self.stage = ""
        self._last: tuple[str, str] | None = None
        self._at = 0.0

    def __call__(self, p) -> None:
        if self.jobs._stopping.is_set() and p.stage not in ("publish", "done"):
            raise _Stopped()
        self.stage = p.stage
        now = time.monotonic()
        key = (p.stage, p.part)
        if key == self._last and now - self._at < PROGRESS_INTERVAL:
            return
        self._last, self._at = key, now
        self.job = self.jobs._update(self.job.id, stage=p.stage, part=p.part, fraction=float(p.fraction))
        self.jobs._emit(self.job, p.message)
