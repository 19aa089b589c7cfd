"""One answer: a `generate` request streamed to the terminal as tokens arrive,
with the model's load shown on stderr, and the sampling options a user can set."""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from client import render
from client.connection import Connection
from shared.protocol import Event, Generate, ProtocolError

# What `/set` and the command line may change, with how to read a typed value.
SAMPLING: dict[str, Callable[[str], Any]] = {
    "temperature": float, "top_k": int, "top_p": float, "repetition_penalty": float,
    "seed": int, "max_tokens": int, "keep_alive": str,
}


@dataclass
class Answer:
    text: str
    done: dict[str, Any]  # the done event's fields: done_reason and the statistics

    @property
    def reason(self) -> str:
        return str(self.done.get("done_reason", ""))


def parse_setting(key: str, text: str) -> Any:
    """`/set KEY VALUE`: the value checked as the protocol checks it."""
    if key not in SAMPLING:
        raise ProtocolError("bad_request", f"no setting {key!r}", hint=f"settings: {', '.join(SAMPLING)}")
    try:
        value = SAMPLING[key](text)
    except ValueError:
        kind = {int: "a whole number", float: "a number"}.get(SAMPLING[key], "a value")
        raise ProtocolError("bad_request", f"{key} must be {kind}, got {text!r}") from None
    check_options({key: value})
    return value


def check_options(options: Mapping[str, Any]) -> None:
    """ProtocolError (bad_request, naming the field) for a value the daemon would refuse."""
    Generate(id="check", model="m", prompt="", **options)


def show_options(options: Mapping[str, Any]) -> str:
    if not options:
        return "sampling: the daemon's defaults (greedy, max_tokens 256)"
    return "sampling: " + ", ".join(f"{k} {_show(v)}" for k, v in options.items())


def _show(value: Any) -> str:
    return "forever" if isinstance(value, float) and math.isinf(value) else f"{value:g}" \
        if isinstance(value, float) else str(value)


def event_json(event: Event) -> str:
    return json.dumps({"id": event.id, "event": event.event, **event.data}, ensure_ascii=False, default=str)


def stream_answer(conn: Connection, request: Generate, out: TextIO, err: TextIO,
                  json_out: Callable[[Event], None] | None = None) -> Answer:
    """Send ``request`` and print the answer as it comes; Ctrl-C cancels it (the
    answer then ends with done_reason "cancelled"). Error events raise ProtocolError."""
    status = render.StatusLine(err)
    unicode = render.can_draw_unicode(err)
    parts: list[str] = []
    for event in conn.stream(request):
        if json_out is not None:
            json_out(event)
        if event.event == "progress" and event.get("kind") == "load":
            fraction = event.get("fraction", 0.0)
            status.show(f"loading {request.model} {render.bar(fraction, 20, unicode)} {render.percent(fraction)}")
        elif event.event == "token":
            status.clear()
            text = event.get("text") or ""
            parts.append(text)
            if json_out is None and text:
                out.write(text)
                out.flush()
        elif event.final:
            status.clear()
            if event.event == "error" and "".join(parts) and json_out is None:
                out.write("\n")  # the error goes on a line of its own
            event.raise_for_error()
            if event.event == "done":
                return Answer("".join(parts), dict(event.data))
    status.clear()
    return Answer("".join(parts), {"done_reason": "cancelled"})
