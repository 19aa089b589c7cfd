"""The jobs: every input the daemon was given, queued in the journal and
converted one at a time, in submission order, by one worker thread."""
from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from anemlld import layout
from anemlld.convert import memory
from anemlld.jobs.child import ChildConversions, Stopped
from anemlld.jobs.inputs import Input, converted_problem, describe, manifest_options
from anemlld.jobs.journal import UNFINISHED, Job, Journal
from anemlld.jobs.placement import Placement
from anemlld.listeners import Listeners
from anemlld.registry import Registry
from shared.errors import AnemllError, BadInput
from shared.options import ConvertOptions
from shared.settings import Settings
from shared.sidecar import NAME_FORM, NAME_RE

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.5  # seconds between journal writes of one job's progress (stage changes always go)

ConvertFn = Callable[..., Any]  # pipeline.convert(src_dir, out_dir, options, progress=fn)
ProgressListener = Callable[[dict[str, Any]], None]


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
        self._stopping = threading.Event()
        self._children = ChildConversions(self._stopping, available_memory)
        self._listeners: Listeners[ProgressListener] = Listeners()
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._queue: collections.deque[int] = collections.deque()
        self._current: int | None = None
        self._thread: threading.Thread | None = None
        self._journal = Journal(Path(settings.journal_path), self._children.pids)
        self._placement = Placement(settings)

    @property
    def memory_poll_seconds(self) -> float:
        """How often a conversion waiting for memory looks again."""
        return self._children.memory_poll_seconds

    @memory_poll_seconds.setter
    def memory_poll_seconds(self, seconds: float) -> None:
        self._children.memory_poll_seconds = seconds

    # -- life cycle ---------------------------------------------------------

    def start(self) -> None:
        """Finish what a crash interrupted, announce known models to the
        registry, queue unfinished jobs in order, start the worker. Call it
        before the watcher starts reporting."""
        if self._thread is not None:
            return
        self._stopping.clear()
        with self._lock:
            for job in self._journal.newest_per_input_failed():  # the newest job of an input decides where it is
                self._placement.place(job, repairing=True)
            queued = self._journal.requeue_running()
            self._restore_registry()
            for job_id in queued:
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
            self._journal.close()

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
            job = self._journal.latest_named(name)
            if job is None:
                known = self._journal.failed_names()
                raise AnemllError(f"no model named {name!r} has failed",
                                  f"failed models: {', '.join(known)}" if known else "no model has failed",
                                  code="not_found")
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
        return self._journal.all()

    def get(self, job_id: int) -> Job | None:
        return self._journal.get(job_id)

    # -- submitting ---------------------------------------------------------

    def _submit(self, where: Path, origin: Path, overrides: dict[str, Any], *, explicit: bool,
                coming_back_from: Path | None = None) -> tuple[Job, bool]:
        """Write the job for the input at ``where`` (belonging at ``origin``);
        returns (job, created). ``coming_back_from``: a retry's failed-folder copy."""
        info = describe(where, origin, overrides)
        with self._lock:
            same = self._same_input(info.fingerprint, include_failed=not explicit)
            if same is not None:
                log.info("%s: same input as job %d (%s); not queued again", origin.name, same.id, same.state)
                return same, False
            problem = info.error or (converted_problem(where) if info.converted else None)
            if problem is not None:
                job = self._fail_at_submit(origin, coming_back_from, info, overrides, problem)
            else:
                job = self._insert(info, origin, coming_back_from, overrides,
                                   state="done" if info.converted else "queued")
                self._placement.place(job)
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
        for job in self._journal.with_fingerprint(fingerprint):
            if job.state in UNFINISHED or (job.state == "failed" and include_failed):
                return job
            if job.state == "done" and job.output and (Path(job.output) / layout.META_FILE).is_file():
                return job
        return None

    def _insert(self, info: Input, origin: Path, failed_path: Path | None, overrides: dict[str, Any],
                state: str = "queued", error: dict | None = None) -> Job:
        done = state == "done"  # a converted folder, registered where it is
        return self._journal.insert(
            name=info.name, kind=info.kind, source=failed_path if state == "failed" and failed_path else origin,
            origin=origin, failed_path=failed_path, fingerprint=info.fingerprint, options=info.options,
            serve=info.serve, overrides=overrides, state=state,
            stage="done" if done else (error or {}).get("stage", ""), fraction=1.0 if done else 0.0,
            error=error, output=origin if done else None)

    def _fail_at_submit(self, origin: Path, coming_back_from: Path | None, info: Input,
                        overrides: dict[str, Any], problem: AnemllError) -> Job:
        """A bad sidecar or a broken converted folder: the job is failed from
        the start and the input moves to the failed folder."""
        failed = coming_back_from or self._placement.failed_home(origin)
        error = self._placement.error_record(problem, "register" if info.converted else "sidecar", info.name,
                                             failed or origin)
        job = self._insert(info, origin, failed, overrides, state="failed", error=error)
        log.warning("%s failed at %s: %s", info.name, error["stage"], error["message"])
        self._placement.place(job)
        return job

    def _announce_registered(self, job: Job) -> None:
        folder = Path(job.origin)
        options = job.public_options or manifest_options(folder)
        self.registry.upsert(job.name, state="ready", source=job.origin, path=job.output, options=options,
                             size_bytes=layout.folder_size(folder), error=None, pin=job.pin, keep_alive=job.keep_alive)
        log.info("registered the converted model %s in %s (job %d)", job.name, folder, job.id)

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
            except Stopped:
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
        self._placement.place(job)
        out = Path(self.settings.models_dir) / job.name
        job = self._journal.update(job.id, state="running", stage="", part="", fraction=0.0, eta_seconds=None,
                                   error=None)
        self.registry.upsert(job.name, state="converting", source=job.origin, options=job.public_options,
                             error=None, pin=job.pin, keep_alive=job.keep_alive)
        self._emit(job, "started")
        log.info("converting %s (job %d) from %s", job.name, job.id, job.origin)
        progress = _ProgressReporter(self, job)
        try:
            if self._convert is not None:
                self._convert(Path(job.origin), out, ConvertOptions(**job.options), progress=progress)
            else:
                self._children.convert(job, out, progress)
        except Stopped:
            raise
        except Exception as e:
            if not isinstance(e, AnemllError):
                log.exception("converting %s failed unexpectedly", job.name)
            self._fail(job, e, progress.stage)
            return
        size = layout.folder_size(out)
        job = self._journal.update(job.id, state="done", stage="done", part="", fraction=1.0, output=str(out))
        self.registry.upsert(job.name, state="ready", source=job.origin, path=str(out), options=job.public_options,
                             size_bytes=size, error=None, pin=job.pin, keep_alive=job.keep_alive)
        self._emit(job, "done")
        log.info("%s is ready: %s (%.1f MB)", job.name, out, size / 2**20)

    def _fail(self, job: Job, e: BaseException, stage: str) -> Job:
        """Journal first, then move the input, then announce."""
        with self._lock:
            origin = Path(job.origin)
            failed = self._placement.failed_home(origin) if origin.exists() else None
            error = self._placement.error_record(e, stage, job.name, failed or origin)
            job = self._journal.update(job.id, state="failed", stage=error["stage"], error=json.dumps(error),
                                       failed_path=str(failed) if failed else None, source=str(failed or origin))
            self._placement.place(job)
        log.warning("%s failed at %s: %s", job.name, error["stage"], error["message"])
        self.registry.upsert(job.name, state="failed", source=job.source, error=error)
        self._emit(job, error["message"])
        return job

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
                                     options=job.public_options or manifest_options(Path(job.output)),
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


class _ProgressReporter:
    """The converter's progress callback for one job: journal and listener,
    throttled; at a stage boundary after ``stop``, raises :class:`Stopped`."""

    def __init__(self, jobs: Jobs, job: Job):
        self.jobs, self.job = jobs, job
        self.stage = ""
        self._last: tuple[str, str] | None = None
        self._at = 0.0

    def __call__(self, p) -> None:
        if self.jobs._stopping.is_set() and p.stage not in ("publish", "done"):
            raise Stopped()
        self.stage = p.stage
        now = time.monotonic()
        key = (p.stage, p.part)
        if key == self._last and now - self._at < PROGRESS_INTERVAL:
            return
        self._last, self._at = key, now
        eta = getattr(p, "eta_seconds", None)
        self.job = self.jobs._journal.update(self.job.id, stage=p.stage, part=p.part, fraction=float(p.fraction),
                                             eta_seconds=None if eta is None else float(eta))
        self.jobs._emit(self.job, p.message)
