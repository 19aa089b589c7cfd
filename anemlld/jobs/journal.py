"""The journal: one SQLite row per job, in WAL mode at
``settings.journal_path``, every statement committed at once. It is what
makes a kill -9 at any moment harmless (the order of writes is in
:mod:`anemlld.jobs`)."""
from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from shared.options import ConvertOptions

STATES = ("queued", "running", "done", "failed")
UNFINISHED = ("queued", "running")

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
    eta_seconds REAL,                       -- time left while running, from the rate measured so far
    error       TEXT,                       -- json: code, stage, message, hint
    output      TEXT,                       -- the converted folder, once done
    created_at  REAL NOT NULL,              -- Unix seconds
    updated_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_fingerprint ON jobs (fingerprint);
"""
ADDED_COLUMNS = {"eta_seconds": "REAL"}  # columns newer than the first journals: added to an old one when opened


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
    eta_seconds: float | None
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
                "stage": self.stage, "part": self.part, "fraction": self.fraction,
                "eta_seconds": self.eta_seconds if self.state == "running" else None, "pid": self.pid,
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


class Journal:
    """The jobs table. Thread-safe; ``pids`` (job id -> conversion child)
    fills in each record's ``pid``."""

    def __init__(self, path: Path, pids: Mapping[int, int]):
        self._pids = pids
        self._lock = threading.RLock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), timeout=30, check_same_thread=False,
                                   isolation_level=None)  # autocommit: every statement commits at once
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        have = {row["name"] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for column, kind in ADDED_COLUMNS.items():
            if column not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _jobs(self, sql: str, *args: Any) -> list[Job]:
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [Job.from_row(r, self._pids.get(r["id"])) for r in rows]

    def get(self, job_id: int) -> Job | None:
        found = self._jobs("SELECT * FROM jobs WHERE id = ?", job_id)
        return found[0] if found else None

    def all(self) -> list[Job]:
        """Every job, in queue order."""
        return self._jobs("SELECT * FROM jobs ORDER BY id")

    def latest_named(self, name: str) -> Job | None:
        found = self._jobs("SELECT * FROM jobs WHERE name = ? ORDER BY id DESC LIMIT 1", name)
        return found[0] if found else None

    def failed_names(self) -> list[str]:
        with self._lock:
            return sorted({r[0] for r in self._db.execute("SELECT name FROM jobs WHERE state = 'failed'")})

    def with_fingerprint(self, fingerprint: str) -> Iterator[Job]:
        """Jobs of the same input, newest first."""
        return iter(self._jobs("SELECT * FROM jobs WHERE fingerprint = ? ORDER BY id DESC", fingerprint))

    def newest_per_input_failed(self) -> list[Job]:
        """The newest job of each input, where it failed or comes back from a failure."""
        return self._jobs("SELECT * FROM jobs WHERE id IN (SELECT MAX(id) FROM jobs GROUP BY origin)"
                          " AND (failed_path IS NOT NULL OR state = 'failed') ORDER BY id")

    def requeue_running(self) -> list[int]:
        """Mark what was running when the daemon stopped as queued again;
        returns the ids of every queued job, in order."""
        with self._lock:
            self._db.execute("UPDATE jobs SET state = 'queued', updated_at = ? WHERE state = 'running'",
                             (time.time(),))
            return [job_id for (job_id,) in self._db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY id")]

    def insert(self, *, name: str, kind: str, source: Path, origin: Path, failed_path: Path | None,
               fingerprint: str, options: dict, serve: dict, overrides: dict, state: str, stage: str,
               fraction: float, error: dict | None, output: Path | None) -> Job:
        now = time.time()
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO jobs (name, kind, source, origin, failed_path, fingerprint, options, serve, overrides,"
                " state, stage, fraction, error, output, created_at, updated_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (name, kind, str(source), str(origin), str(failed_path) if failed_path else None, fingerprint,
                 json.dumps(options), json.dumps(serve), json.dumps(overrides), state, stage, fraction,
                 json.dumps(error) if error else None, str(output) if output else None, now, now))
            return self.get(cur.lastrowid)

    def update(self, job_id: int, **fields: Any) -> Job:
        fields["updated_at"] = time.time()
        columns = ", ".join(f"{k} = ?" for k in fields)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {columns} WHERE id = ?", (*fields.values(), job_id))
            return self.get(job_id)
