"""The drop folder: which of its folders hold a complete model, and telling
the jobs about each one once its copy has settled.

watchdog events only say "look again soon"; a rescan every
``settings.rescan_seconds`` catches whatever the events missed, so the
answer never depends on them. A folder is reported when :func:`readiness`
says its copy is complete *and* its snapshot (every file's relative path,
size and mtime, plus a ``NAME.anemll.toml`` sidecar beside it) has stayed
the same for ``settings.settle_seconds``. Each settled snapshot is reported
once; a folder that changes again (a re-copy, an edited sidecar) is
reported again once it settles, and the jobs layer drops repeats by
fingerprint. A folder that stays incomplete is not an error: it is waited
for, and its reason logged at debug level when it changes.

Ignored in the drop folder: hidden entries (``.x``), plain files, and
``*.anemll.toml`` sidecars (they belong to the folder they are named after).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from anemlld import layout
from anemlld.convert.source import INDEX_FILE, read_index
from shared.errors import AnemllError
from shared.settings import Settings
from shared.sidecar import BESIDE_SUFFIX

log = logging.getLogger(__name__)

# Names copy tools and downloaders give files they are still writing.
IN_PROGRESS_SUFFIXES = (".incomplete", ".lock", ".part", ".tmp")
# huggingface_hub's local-dir downloads keep their bookkeeping here. A finished
# download leaves only ``*.metadata`` files behind (huggingface_hub/_local_folder.py);
# anything else in it (the ``.incomplete`` data, a ``.lock``) is a download in progress.
HF_DOWNLOAD_DIR = Path(".cache") / "huggingface" / "download"
HF_FINISHED_SUFFIXES = (".metadata",)
HF_HOUSEKEEPING = (".gitignore", "CACHEDIR.TAG")
# Events arrive in bursts while a copy runs; scanning at most this often
# coalesces them without delaying a settled folder noticeably.
MIN_SCAN_INTERVAL = 0.2

Snapshot = tuple[tuple[str, int, int], ...]  # (relative path, size, mtime_ns), sorted


def snapshot(folder: Path) -> Snapshot:
    """Every file under ``folder`` (hidden ones too: a downloader's temporary
    files count as change) and the sidecar beside it, as (path, size, mtime_ns)."""
    entries: list[tuple[str, int, int]] = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        for name in files:
            path = os.path.join(root, name)
            try:
                st = os.stat(path)
            except OSError:  # removed between listing and stat, or a dangling link
                continue
            rel = os.path.relpath(path, folder)
            entries.append((rel, st.st_size, 0 if layout.rewritten_on_load(rel) else st.st_mtime_ns))
    beside = beside_sidecar(folder)
    try:
        st = beside.stat()
        entries.append((f"../{beside.name}", st.st_size, st.st_mtime_ns))
    except OSError:
        pass
    return tuple(sorted(entries))


def beside_sidecar(folder: Path) -> Path:
    return folder.parent / f"{folder.name}{BESIDE_SUFFIX}"


def readiness(folder: Path) -> tuple[bool, str]:
    """Whether ``folder``'s copy looks complete, and why not. Pure: no timing
    (settling is :class:`Settle`'s job)."""
    folder = Path(folder)
    if not folder.is_dir():
        return False, "not a folder"
    busy = _in_progress_file(folder)
    if busy:
        return False, busy
    if (folder / layout.META_FILE).is_file():
        return _converted_readiness(folder)
    if not (folder / "config.json").is_file():
        return False, "no config.json yet"
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            shards = read_index(index)
        except AnemllError:
            return False, f"{INDEX_FILE} cannot be read yet"
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            return False, f"shard {missing[0]} listed in {INDEX_FILE} is not there yet ({len(missing)} missing)"
        return True, f"complete: config.json and {len(shards)} shards"
    if not any(folder.glob("*.safetensors")):
        return False, "no *.safetensors weights yet"
    return True, "complete: config.json and safetensors weights"


def _in_progress_file(folder: Path) -> str:
    """The first sign of a copy or download still running, '' if none."""
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(IN_PROGRESS_SUFFIXES):
                rel = os.path.relpath(os.path.join(root, name), folder)
                return f"{rel} is still being written"
    download = folder / HF_DOWNLOAD_DIR
    if download.is_dir():
        for path in sorted(download.rglob("*")):
            if path.is_file() and not path.name.endswith(HF_FINISHED_SUFFIXES) and path.name not in HF_HOUSEKEEPING:
                return f"a Hugging Face download is in progress ({path.relative_to(folder)})"
    return ""


def _converted_readiness(folder: Path) -> tuple[bool, str]:
    """A folder that already holds converted parts: meta.yaml readable and
    every part it names present."""
    try:
        lay = layout.read_meta(folder)
        parts = lay.parts()
    except AnemllError as e:
        return False, f"converted model not complete yet: {e.message}"
    return True, f"converted model: {len(parts)} parts"


@dataclass
class _Seen:
    snapshot: Snapshot
    since: float  # when this snapshot was first seen
    ready: bool = False
    reason: str = ""
    reported: bool = False


class Settle:
    """Per folder: the last snapshot seen, since when, and whether it was
    reported. A snapshot is due once it has been ready and unchanged for
    ``seconds``; then never again until it changes."""

    def __init__(self, seconds: float, stalled: float | None = None):
        self.seconds = seconds
        self.stalled = stalled  # incomplete but unchanged this long: due anyway, so a job fails it clearly
        self._seen: dict[Path, _Seen] = {}

    def observe(self, folder: Path, snap: Snapshot, now: float) -> _Seen:
        """Record what ``folder`` looks like at ``now``; returns its record."""
        seen = self._seen.get(folder)
        if seen is None or seen.snapshot != snap:
            seen = self._seen[folder] = _Seen(snap, now)
        return seen

    def _wait(self, seen: _Seen) -> float | None:
        if seen.reported:
            return None
        return self.seconds if seen.ready else self.stalled

    def due(self, seen: _Seen, now: float) -> bool:
        wait = self._wait(seen)
        return wait is not None and now - seen.since >= wait

    def next_deadline(self) -> float | None:
        """When the earliest unreported folder will be due."""
        times = [s.since + w for s in self._seen.values() if (w := self._wait(s)) is not None]
        return min(times, default=None)

    def keep_only(self, folders: set[Path]) -> None:
        """Forget folders that left the drop folder (moved, deleted)."""
        for gone in set(self._seen) - folders:
            del self._seen[gone]


class DropWatcher:
    """Watches ``settings.drop_dir`` and calls ``on_ready(folder)`` for each
    settled, complete folder. ``start`` runs one thread (plus watchdog's
    observer); ``on_ready`` is called from that thread, and an exception it
    raises is logged, never fatal."""

    def __init__(self, settings: Settings, on_ready: Callable[[Path], None],
                 clock: Callable[[], float] = time.monotonic):
        self.drop_dir = Path(settings.drop_dir)
        self.rescan_seconds = settings.rescan_seconds
        self.on_ready = on_ready
        self.clock = clock
        self.settle = Settle(settings.settle_seconds, settings.stalled_seconds)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer = None

    # -- one pass -----------------------------------------------------------

    def candidates(self) -> list[Path]:
        """The drop folder's entries that may be models."""
        try:
            entries = sorted(os.scandir(self.drop_dir), key=lambda e: e.name)
        except FileNotFoundError:
            return []
        out = []
        for entry in entries:
            if entry.name.startswith(".") or entry.name.endswith(BESIDE_SUFFIX):
                continue
            try:
                if entry.is_dir():  # follows a symlink to a folder
                    out.append(Path(entry.path))
            except OSError:
                continue
        return out

    def scan(self, now: float | None = None) -> list[Path]:
        """Look at every candidate once; report (and return) the folders that
        are due. Tests call this directly with their own ``now``."""
        now = self.clock() if now is None else now
        folders = self.candidates()
        self.settle.keep_only(set(folders))
        due = []
        for folder in folders:
            try:
                snap = snapshot(folder)
            except OSError as e:
                log.debug("%s: cannot list it yet (%s)", folder.name, e)
                continue
            seen = self.settle.observe(folder, snap, now)
            if seen.reported:
                continue
            ready, reason = readiness(folder)
            if reason != seen.reason:
                log.debug("%s: %s", folder.name, reason)
            seen.ready, seen.reason = ready, reason
            if self.settle.due(seen, now):
                seen.reported = True
                due.append((folder, reason))
        for folder, reason in due:
            log.info("%s is %s (%s)", folder.name, "ready" if self.settle._seen[folder].ready else
                     "still incomplete after stalled_seconds; handing it over to fail with the reason", reason)
            try:
                self.on_ready(folder)
            except Exception:
                log.exception("handling the ready folder %s failed", folder)
        return [folder for folder, _ in due]

    # -- the thread ---------------------------------------------------------

    def start(self) -> None:
        self.drop_dir.mkdir(parents=True, exist_ok=True)
        self._stop.clear()
        self._observer = self._start_observer()
        self._thread = threading.Thread(target=self._loop, name="anemlld-watcher", daemon=True)
        self._thread.start()
        log.info("watching %s (settle %.1fs, rescan every %.1fs)", self.drop_dir, self.settle.seconds,
                 self.rescan_seconds)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            try:
                self._observer.stop()
                self._observer.join(timeout)
            except Exception:
                log.debug("stopping the watchdog observer failed", exc_info=True)
            self._observer = None
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def poke(self) -> None:
        """Scan soon (what a watchdog event does)."""
        self._wake.set()

    def _start_observer(self):
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:
            log.warning("watchdog is not installed: relying on the rescan every %.1fs", self.rescan_seconds)
            return None

        watcher = self

        class Hint(FileSystemEventHandler):
            def on_any_event(self, event) -> None:
                watcher.poke()

        observer = Observer()
        try:
            observer.schedule(Hint(), str(self.drop_dir), recursive=True)
            observer.daemon = True
            observer.start()
        except Exception as e:  # e.g. the inotify watch limit: the rescan still works
            log.warning("file events unavailable for %s (%s): relying on the rescan every %.1fs",
                        self.drop_dir, e, self.rescan_seconds)
            return None
        return observer

    def _loop(self) -> None:
        last = -MIN_SCAN_INTERVAL
        while not self._stop.is_set():
            wait = MIN_SCAN_INTERVAL - (self.clock() - last)
            if wait > 0 and self._stop.wait(wait):
                break
            self._wake.clear()  # before scanning: an event during the scan means look again
            last = self.clock()
            try:
                self.scan(last)
            except Exception:
                log.exception("scanning %s failed", self.drop_dir)
            self._wake.wait(self._timeout())

    def _timeout(self) -> float:
        timeout = self.rescan_seconds
        deadline = self.settle.next_deadline()
        if deadline is not None:
            timeout = min(timeout, max(deadline - self.clock(), 0.0))
        return timeout
