"""Where an input lives: at its origin while queued, converting or done; in
the failed folder with an ``error.json`` after a failure, if it came from the
drop folder. An input given by path elsewhere stays where it is, and its
``error.json`` goes to ``FAILED/<folder name>.error.json``. Every move is
idempotent, so ``start`` can finish one that a crash interrupted."""
from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from anemlld.jobs.journal import Job
from shared.errors import AnemllError
from shared.settings import Settings
from shared.sidecar import BESIDE_SUFFIX

log = logging.getLogger(__name__)

ERROR_FILE = "error.json"


def beside(folder: Path) -> Path:
    """The sidecar that sits next to ``folder``."""
    return folder.parent / f"{folder.name}{BESIDE_SUFFIX}"


class Placement:
    def __init__(self, settings: Settings):
        self.settings = settings

    def error_record(self, e: BaseException, stage: str, name: str, where: Path) -> dict[str, Any]:
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

    def failed_home(self, origin: Path) -> Path | None:
        """Where a failed input from the drop folder goes: FAILED/<its name>,
        or <its name>-2, -3... if taken. None for inputs from elsewhere."""
        if origin.parent.resolve() != Path(self.settings.drop_dir).resolve():
            return None
        failed_dir = Path(self.settings.failed_dir)
        for i in range(1, 10_000):
            home = failed_dir / (origin.name if i == 1 else f"{origin.name}-{i}")
            if not os.path.lexists(home) and not os.path.lexists(beside(home)):
                return home
        raise AnemllError(f"the failed folder {failed_dir} is full of {origin.name} copies",
                          "empty the failed folder", stage="failed")

    def place(self, job: Job, repairing: bool = False) -> None:
        """Put the input where the job's state says it belongs: a failed one
        in the failed folder with its error.json, any other at its origin."""
        origin = Path(job.origin)
        failed = Path(job.failed_path) if job.failed_path else None
        if job.state == "failed":
            if repairing and has_error_file(origin):
                return  # our error.json is in it: moved back by its owner, not left behind by a crash
            if failed is not None:
                _move(origin, failed)
            self._write_error_file(job)
        elif failed is not None:
            _move(failed, origin)
            _remove_error_file(origin)

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


def has_error_file(folder: Path) -> bool:
    try:
        return "retry" in json.loads((folder / ERROR_FILE).read_text(encoding="utf-8"))  # ours, not the model's
    except (OSError, ValueError, TypeError):
        return False


def _remove_error_file(folder: Path) -> None:
    if has_error_file(folder):
        try:
            (folder / ERROR_FILE).unlink()
        except OSError as e:
            log.warning("cannot remove %s: %s", folder / ERROR_FILE, e)


def _move(src: Path, dst: Path) -> None:
    """Move a folder and its beside sidecar, unless already moved."""
    for a, b in ((src, dst), (beside(src), beside(dst))):
        if os.path.lexists(a) and not os.path.lexists(b):
            b.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.move(str(a), str(b))
            except OSError as e:
                log.error("cannot move %s to %s: %s", a, b, e)
            else:
                log.info("moved %s to %s", a, b)
