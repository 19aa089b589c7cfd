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

The modules: ``queue`` (:class:`Jobs`: requests, the worker thread),
``journal`` (the table), ``inputs`` (what a folder is and asks for),
``placement`` (where an input lives: the failed folder, ``error.json``) and
``child`` (a conversion in a child process: retries, waiting for memory).
"""
from anemlld.jobs.child import ATTEMPTS, WAITING_FOR_MEMORY, ConversionDied
from anemlld.jobs.inputs import input_fingerprint, input_files
from anemlld.jobs.journal import STATES, UNFINISHED, Job
from anemlld.jobs.queue import Jobs

__all__ = ["ATTEMPTS", "STATES", "UNFINISHED", "WAITING_FOR_MEMORY", "ConversionDied", "Job", "Jobs",
           "input_files", "input_fingerprint"]
