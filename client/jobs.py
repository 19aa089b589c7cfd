"""Following conversion jobs: the `jobs` list with the `watch` stream applied on
top of it (docs/protocol.md, "watch"), drawn as bars on a terminal or as one
line per change anywhere else."""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from client import render
from client.connection import Connection, Interrupted, cancel_on_interrupt
from shared.protocol import Event, Jobs, Models, Watch

FINISHED = ("done", "failed")


class JobBoard:
    """The jobs as last known: the list first, then every progress and model
    event on top. ``apply`` returns the job an event changed, if any."""

    def __init__(self) -> None:
        self.jobs: dict[Any, dict[str, Any]] = {}

    def load(self, jobs: list[Mapping[str, Any]]) -> None:
        # events that arrived before the list are newer than it: keep them
        known = self.jobs
        self.jobs = {j.get("job"): dict(j) for j in jobs}
        for key, job in known.items():
            self.jobs[key] = {**self.jobs.get(key, {}), **job}

    def apply(self, event: Event) -> dict[str, Any] | None:
        now = time.time()
        if event.event == "progress" and event.get("kind") == "convert":
            key = event.get("job")
            job = self.jobs.setdefault(key, {"job": key, "name": event.get("model"), "created_at": now})
            job.update(state="running", stage=event.get("stage"), part=event.get("part"),
                       fraction=event.get("fraction", job.get("fraction", 0.0)),
                       eta_seconds=event.get("eta_seconds"), updated_at=now)
            return job
        if event.event == "model" and isinstance(event.get("model"), Mapping):
            model = event["model"]
            job = self.latest(str(model.get("name")))
            if job is None:
                return None
            state = model.get("state")
            if state in ("ready", "loaded"):
                job.update(state="done", fraction=1.0, updated_at=now)
            elif state == "failed":
                job.update(state="failed", error=model.get("error"), updated_at=now)
            elif state == "converting":
                job.update(state="running", updated_at=now)
            elif state == "queued":
                job.update(state="queued", updated_at=now)
            return job
        return None

    def latest(self, name: str) -> dict[str, Any] | None:
        """The newest job for model ``name`` (a retry makes a second one)."""
        mine = [j for j in self.jobs.values() if j.get("name") == name]
        return mine[-1] if mine else None

    @property
    def all_finished(self) -> bool:
        return all(j.get("state") in FINISHED for j in self.jobs.values())


def show_jobs(conn: Connection, out: TextIO) -> int:
    jobs = conn.call(Jobs(id=conn.next_id()))["jobs"]
    if not jobs:
        out.write("no conversion jobs\n")
        return 0
    tty = render.is_tty(out)
    lines = render.jobs_lines(jobs, render.Style.for_stream(out), bars=tty, unicode=render.can_draw_unicode(out))
    out.write("\n".join(lines) + "\n")
    return 0


def follow_jobs(conn: Connection, out: TextIO, json_out: Callable[[Event], None] | None = None) -> int:
    """``--jobs --watch``: show the jobs and follow them until every one has
    finished (or Ctrl-C)."""
    watch_id = conn.send(Watch(id=conn.next_id()))
    jobs_id = conn.send(Jobs(id=conn.next_id()))
    board = JobBoard()
    tty = render.is_tty(out) and json_out is None
    style = render.Style.for_stream(out)
    unicode = render.can_draw_unicode(out)
    live = render.LiveBlock(out) if tty else None
    listed = False
    last_seen: dict[Any, tuple] = {}
    last_draw = 0.0

    def draw(force: bool = False) -> None:
        nonlocal last_draw
        if live is None or (not force and time.monotonic() - last_draw < 0.1):
            return
        last_draw = time.monotonic()
        if board.jobs:
            live.update(render.jobs_lines(list(board.jobs.values()), style, bars=True, unicode=unicode))
        else:
            live.update(["no conversion jobs; waiting for one (Ctrl-C to stop)"])

    with cancel_on_interrupt() as interrupted:
        while True:
            if interrupted.is_set():
                _end_watch(conn, watch_id)
                raise Interrupted()
            event = conn.wait({watch_id, jobs_id}, timeout=0.5)
            if event is None:
                draw()
                continue
            if json_out is not None:
                json_out(event)
            event.raise_for_error()
            if event.id == jobs_id:
                board.load(event["jobs"])
                listed = True
                if not board.jobs:
                    out.write("no conversion jobs\n")
                    _end_watch(conn, watch_id)
                    return 0
                if json_out is None and live is None:
                    out.write("\n".join(render.jobs_lines(list(board.jobs.values()), style, bars=False)) + "\n")
                    last_seen = {k: (j.get("state"), j.get("stage")) for k, j in board.jobs.items()}
                draw(force=True)
            elif event.id == watch_id:
                if event.final:  # the daemon ended the watch (shutting down)
                    break
                job = board.apply(event)
                if job is not None and json_out is None and live is None and listed:
                    key = (job.get("state"), job.get("stage"))
                    if last_seen.get(job.get("job")) != key:
                        last_seen[job.get("job")] = key
                        out.write(render.job_line(job) + "\n")
                        out.flush()
                draw()
            if listed and board.all_finished:
                draw(force=True)
                _end_watch(conn, watch_id)
                break
    if json_out is None:
        failed = [j for j in board.jobs.values() if j.get("state") == "failed"]
        out.write("all jobs finished" + (f", {len(failed)} failed" if failed else "") + "\n")
    return 0


def wait_for_model(conn: Connection, name: str, err: TextIO,
                   json_out: Callable[[Event], None] | None = None) -> dict[str, Any]:
    """Show ``name``'s conversion and return its model record once it is ready
    or loaded. The watch is sent first, so no change can fall between the list
    and the stream. A failure returns the failed record."""
    watch_id = conn.send(Watch(id=conn.next_id()))
    jobs_id = conn.send(Jobs(id=conn.next_id()))
    models_id = conn.send(Models(id=conn.next_id()))
    board = JobBoard()
    status = render.StatusLine(err)
    said: tuple = ()
    record: dict[str, Any] | None = None

    def show() -> None:
        nonlocal said
        job = board.latest(name)
        if job is None:
            return
        state, stage, fraction = job.get("state"), job.get("stage") or "", job.get("fraction", 0.0)
        if status.enabled and state == "queued":
            status.show(f"{name} is queued for conversion  (Ctrl-C to stop waiting)")
        elif status.enabled:
            left = render.time_left(job)
            status.show(f"converting {name}: {stage} {render.bar(fraction, 20, render.can_draw_unicode(err))} "
                        f"{render.percent(fraction)}{', ' + left if left else ''}  (Ctrl-C to stop waiting)")
        elif (state, stage) != said and json_out is None:
            said = (state, stage)
            words = ("waiting for", f"{name}:", state, stage, render.percent(fraction).strip())
            err.write(" ".join(w for w in words if w) + "\n")
            err.flush()

    with cancel_on_interrupt() as interrupted:
        while True:
            if interrupted.is_set():
                status.clear()
                _end_watch(conn, watch_id)
                raise Interrupted()
            event = conn.wait({watch_id, jobs_id, models_id}, timeout=0.5)
            if event is None:
                continue
            if json_out is not None:
                json_out(event)
            event.raise_for_error()
            if event.id == jobs_id:
                board.load(event["jobs"])
            elif event.id == models_id:
                record = next((m for m in event["models"] if m.get("name") == name), None)
            elif event.id == watch_id:
                if event.final:
                    break
                board.apply(event)
                if event.event == "model" and event["model"].get("name") == name:
                    record = dict(event["model"])
            if record is not None and record.get("state") in ("ready", "loaded", "failed"):
                break
            show()
    status.clear()
    _end_watch(conn, watch_id)
    for rid in (jobs_id, models_id):
        conn.forget(rid)
    if record is None:
        record = {"name": name, "state": "failed", "error": {"message": "anemlld ended the watch"}}
    return record


def _end_watch(conn: Connection, watch_id: str) -> None:
    """Cancel the watch and let its done/cancelled arrive (or not: it is dropped)."""
    if not conn.pending(watch_id):
        return
    try:
        conn.cancel(watch_id, timeout=2.0)
        conn.wait({watch_id}, timeout=2.0)
    except Interrupted:
        pass
    conn.forget(watch_id)
