"""The management verbs: --list, --ps, --jobs [--watch], --convert, --retry.
Each prints plain text (coloured on a terminal), or with --json the daemon's
event as a JSON line, and returns the exit code."""
from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from typing import Any, TextIO

from client import render
from client.connection import Connection
from client.jobs import follow_jobs, show_jobs
from shared.options import ConvertOptions
from shared.protocol import Convert, Event, Jobs, Models, ProtocolError, Ps, Request, Retry
from shared.settings import Settings

JsonOut = Callable[[Event], None] | None


def list_models(conn: Connection, settings: Settings, out: TextIO, json_out: JsonOut) -> int:
    event = conn.call(Models(id=conn.next_id()))
    if json_out:
        json_out(event)
    elif event["models"]:
        out.write("\n".join(render.models_lines(event["models"], render.Style.for_stream(out))) + "\n")
    else:
        out.write(f"no models yet: drop a Hugging Face model folder into {settings.drop_dir}, "
                  "or run: anemll-chat --convert PATH\n")
    return 0


def list_resident(conn: Connection, out: TextIO, json_out: JsonOut) -> int:
    event = conn.call(Ps(id=conn.next_id()))
    if json_out:
        json_out(event)
    elif event["ps"]:
        out.write("\n".join(render.ps_lines(event["ps"], render.Style.for_stream(out))) + "\n")
    else:
        out.write("no models are loaded\n")
    http = conn.hello.get("http") if conn.hello is not None and not json_out else None
    if http:
        out.write(f"HTTP: {http} (OpenAI at {http}/v1, Ollama at {http})\n")
    return 0


def list_jobs(conn: Connection, watch: bool, out: TextIO, json_out: JsonOut) -> int:
    if watch:
        return follow_jobs(conn, out, json_out)
    if json_out:
        json_out(conn.call(Jobs(id=conn.next_id())))
        return 0
    return show_jobs(conn, out)


def convert(conn: Connection, path: str, name: str | None, option_args: list[str], watch: bool, out: TextIO,
            json_out: JsonOut) -> int:
    """Queue a conversion of the folder at ``path``, resolved here: the daemon
    does not share our working directory."""
    options = parse_options(option_args)
    request = Convert(id=conn.next_id(), path=os.path.abspath(os.path.expanduser(path)), name=name,
                      options=options or None)
    return _queue(conn, request, watch, out, json_out)


def retry(conn: Connection, name: str, watch: bool, out: TextIO, json_out: JsonOut) -> int:
    return _queue(conn, Retry(id=conn.next_id(), name=name), watch, out, json_out)


def parse_options(args: list[str]) -> dict[str, Any]:
    """``-o KEY=VALUE`` arguments; the values are checked by the Convert record."""
    options = {}
    for item in args:
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise ProtocolError("bad_request", f"--option {item!r} is not KEY=VALUE",
                                hint="for example: -o context_length=1024 -o lut_ffn=4")
        if key not in ConvertOptions.KEYS:
            close = difflib.get_close_matches(key, ConvertOptions.KEYS, n=1)
            raise ProtocolError("bad_request", f"there is no conversion option {key!r}",
                                hint=(f"did you mean {close[0]}? " if close else "")
                                + f"options: {', '.join(ConvertOptions.KEYS)}")
        options[key] = value.strip()
    return options


def _queue(conn: Connection, request: Request, watch: bool, out: TextIO, json_out: JsonOut) -> int:
    event = conn.call(request)
    if json_out:
        json_out(event)
    else:
        name = event.get('name') or getattr(request, 'name', '')
        if event.get("job") is None and isinstance(request, Retry):
            out.write(f"{name} can be loaded again (its worker had stopped; no conversion needed)\n")
            out.flush()
            return 0
        out.write(f"queued job {event.get('job', '?')}: {name}\n")
        if not watch:
            out.write("follow it with: anemll-chat --jobs --watch\n")
        out.flush()
    return follow_jobs(conn, out, json_out) if watch else 0
