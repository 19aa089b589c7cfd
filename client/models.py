"""Which model to talk to: the one named, else the only ready one, else the
last one used (remembered in a small file under the home's state folder, or
the platform's user state folder), else a message listing the choices. A model
still converting is waited for, or explained with --no-wait."""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from client import render
from client.connection import Connection
from client.jobs import wait_for_model
from shared.errors import AnemllError
from shared.protocol import Event, Jobs, Models, ProtocolError
from shared.settings import Settings

USABLE = ("ready", "loaded")
PENDING = ("queued", "converting")
LAST_MODEL_FILE = "last_model"


class NoModel(AnemllError):
    """No model could be picked, or the one picked cannot answer yet (exit code 2)."""

    code = "no_model"


def chat_state_dir(settings: Settings) -> Path:
    """The client's own corner of the state folder: the last model, the line history."""
    return settings.state_dir / "chat"


def read_last_model(settings: Settings) -> str | None:
    try:
        name = (chat_state_dir(settings) / LAST_MODEL_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return name or None


def remember_model(settings: Settings, name: str) -> None:
    """Best effort: a read-only state folder must not stop a chat."""
    folder = chat_state_dir(settings)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{LAST_MODEL_FILE}.{os.getpid()}"
        tmp.write_text(name + "\n", encoding="utf-8")
        os.replace(tmp, folder / LAST_MODEL_FILE)
    except OSError:
        pass


def choose_model(models: Sequence[Mapping[str, Any]], last: str | None, settings: Settings) -> str:
    """The model to use when none was named, or NoModel with the choices."""
    by_name = {str(m.get("name")): m for m in models}
    usable = [n for n, m in by_name.items() if m.get("state") in USABLE]
    if len(usable) == 1:
        return usable[0]
    if last in by_name and by_name[last].get("state") != "failed":
        return last
    pending = [n for n, m in by_name.items() if m.get("state") in PENDING]
    if not usable and len(pending) == 1:
        return pending[0]
    if not models:
        raise NoModel("there are no models yet",
                      f"drop a Hugging Face model folder into {settings.drop_dir}, "
                      "or run: anemll-chat --convert PATH")
    listing = ", ".join(f"{n} ({m.get('state')})" for n, m in by_name.items())
    choices = usable or pending
    if not choices:
        raise NoModel(f"no model can answer: {listing}", "see why with: anemll-chat --list")
    raise NoModel(f"which model? {listing}", f"name one: anemll-chat {choices[0]}"
                  + (f" (or {', '.join(choices[1:])})" if len(choices) > 1 else ""))


def resolve_model(conn: Connection, settings: Settings, name: str | None, *, wait: bool, err: TextIO,
                  json_out: Callable[[Event], None] | None = None) -> dict[str, Any]:
    """The model record to talk to, ready or loaded; waits for a conversion
    unless ``wait`` is false. Raises NoModel (exit 2) or ProtocolError (exit 1)."""
    models = conn.call(Models(id=conn.next_id()))["models"]
    if name is None:
        name = choose_model(models, read_last_model(settings), settings)
    record = next((m for m in models if m.get("name") == name), None)
    if record is None:
        names = ", ".join(str(m.get("name")) for m in models)
        raise ProtocolError("not_found", f"no model named {name!r}",
                            hint=f"models: {names}" if names else
                            f"there are none yet: drop a Hugging Face folder into {settings.drop_dir}")
    if record.get("state") in PENDING:
        if not wait:
            raise NoModel(still_converting(conn, name), f"follow it with: anemll-chat --jobs --watch, "
                          f"then run: anemll-chat {name}")
        record = wait_for_model(conn, name, err, json_out)
    if record.get("state") == "failed":
        raise model_failed(record)
    return record


def still_converting(conn: Connection, name: str) -> str:
    """'qwen is still converting: running for 3m12s, quantize 42%'."""
    jobs = [j for j in conn.call(Jobs(id=conn.next_id()))["jobs"] if j.get("name") == name]
    if not jobs:
        return f"{name} is waiting to be converted"
    job = jobs[-1]
    created = job.get("created_at")
    since = render.human_duration(time.time() - created) if isinstance(created, (int, float)) else "a while"
    if job.get("state") == "queued":
        return f"{name} is queued for conversion (job {job.get('job')}, waiting for {since})"
    stage = f", at {job['stage']} {render.percent(job.get('fraction')).strip()}" if job.get("stage") else ""
    return f"{name} is still converting (job {job.get('job')}, running for {since}{stage})"


def model_failed(record: Mapping[str, Any]) -> ProtocolError:
    error = record.get("error") if isinstance(record.get("error"), Mapping) else {}
    stage = f" at {error['stage']}" if error.get("stage") else ""
    message = f"{record.get('name')} failed to convert{stage}: {error.get('message') or 'see anemll-chat --list'}"
    return ProtocolError("model_failed", message,
                         hint=str(error.get("hint") or f"fix it, then run: anemll-chat --retry {record.get('name')}"))
