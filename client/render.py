"""What the client prints: tables of models, resident models and jobs, progress
bars, the per-answer statistics line, error lines.

On a terminal: colours (unless NO_COLOR or TERM=dumb) and progress bars
redrawn in place. Anywhere else (a pipe, a file, a test): plain text, no escape
sequences, no bars, nothing redrawn.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO


STATE_COLOURS = {"loaded": "32", "ready": "36", "converting": "33", "queued": "33", "running": "33",
                 "failed": "31", "done": "32"}


def is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Style:
    """ANSI colours when ``color``; the identity otherwise."""

    def __init__(self, color: bool):
        self.color = color

    @classmethod
    def for_stream(cls, stream: TextIO) -> "Style":
        return cls(is_tty(stream) and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb")

    def _wrap(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color and text else text

    def bold(self, text: str) -> str:
        return self._wrap("1", text)

    def dim(self, text: str) -> str:
        return self._wrap("2", text)

    def red(self, text: str) -> str:
        return self._wrap("31", text)

    def state(self, state: str, text: str | None = None) -> str:
        return self._wrap(STATE_COLOURS.get(state, "0"), state if text is None else text)


# -- small formats -------------------------------------------------------------

def human_size(n: Any) -> str:
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_duration(seconds: float) -> str:
    """Rounded for people: 45s, 3m12s, 2h05m, 3d4h."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def human_until(expires_at: Any, pinned: bool, now: float) -> str:
    if pinned:
        return "pinned"
    if not isinstance(expires_at, (int, float)):
        return "forever"
    left = expires_at - now
    return f"in {human_duration(left)}" if left > 0 else "now"


def time_left(job: Mapping[str, Any]) -> str:
    """"about 3m10s left" for a running conversion that reports it, else ""."""
    eta = job.get("eta_seconds")
    if job.get("state") != "running" or not isinstance(eta, (int, float)) or isinstance(eta, bool) or eta < 0:
        return ""
    return f"about {human_duration(eta)} left"


def percent(fraction: Any) -> str:
    f = fraction if isinstance(fraction, (int, float)) else 0.0
    return f"{max(0.0, min(1.0, f)) * 100:3.0f}%"


def bar(fraction: Any, width: int = 24, unicode: bool = True) -> str:
    f = max(0.0, min(1.0, fraction if isinstance(fraction, (int, float)) else 0.0))
    filled = int(round(f * width))
    full, empty = ("█", "░") if unicode else ("#", "-")
    return full * filled + empty * (width - filled)


def can_draw_unicode(stream: TextIO) -> bool:
    return "utf" in (getattr(stream, "encoding", "") or "").lower()


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], style: Style | None = None) -> list[str]:
    """Left-aligned columns two spaces apart. Cells may hold colour codes: widths
    are measured on the text without them."""
    rows = [list(r) for r in rows]
    plain = [[_strip(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in plain]) for i, h in enumerate(headers)]
    head = "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()
    out = [style.bold(head) if style else head]
    for row, prow in zip(rows, plain):
        cells = [c + " " * (w - len(p)) for c, p, w in zip(row, prow, widths)]
        out.append("  ".join(cells).rstrip())
    return out


def _strip(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\x1b":
            j = text.find("m", i)
            i = len(text) if j < 0 else j + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


# -- the daemon's lists --------------------------------------------------------

def models_lines(models: Sequence[Mapping[str, Any]], style: Style) -> list[str]:
    rows = []
    notes: dict[int, list[str]] = {}
    for i, m in enumerate(models):
        options = m.get("options") or {}
        ctx = options.get("context_length")
        rows.append([str(m.get("name", "?")), style.state(str(m.get("state", "?"))), human_size(m.get("size_bytes")),
                     str(ctx) if ctx else "-", str(m.get("source") or "")])
        err = m.get("error")
        if isinstance(err, Mapping) and err.get("message"):
            stage = f" ({err['stage']})" if err.get("stage") else ""
            notes[i] = [f"    {style.red('error' + stage)}: {err['message']}"]
            if err.get("hint"):
                notes[i].append(f"    -> {err['hint']}")
    lines = table(("NAME", "STATE", "SIZE", "CONTEXT", "SOURCE"), rows, style)
    out = [lines[0]]
    for i, line in enumerate(lines[1:]):
        out.append(line)
        out.extend(notes.get(i, ()))
    return out


def ps_lines(ps: Sequence[Mapping[str, Any]], style: Style, now: float | None = None) -> list[str]:
    now = time.time() if now is None else now
    rows = [[str(r.get("name", "?")), human_size(r.get("size_bytes")),
             human_until(r.get("expires_at"), bool(r.get("pinned")), now),
             str(r.get("requests", "-")), str(r.get("context_length") or "-")] for r in ps]
    return table(("NAME", "SIZE", "UNTIL", "REQUESTS", "CONTEXT"), rows, style)


def job_cells(job: Mapping[str, Any], style: Style, now: float, bars: bool, unicode: bool) -> list[str]:
    state = str(job.get("state", "?"))
    created = job.get("created_at")
    updated = job.get("updated_at")
    if state in ("done", "failed") and isinstance(created, (int, float)) and isinstance(updated, (int, float)):
        took = f"took {human_duration(updated - created)}"
    elif state == "running" and isinstance(created, (int, float)):
        took = ", ".join(t for t in (f"for {human_duration(now - created)}", time_left(job)) if t)
    else:
        took = ""
    fraction = 1.0 if state == "done" else job.get("fraction", 0.0)
    progress = percent(fraction)
    if bars:
        progress = f"{bar(fraction, 20, unicode)} {progress}"
    detail = str(job.get("part") or "") if state in ("running", "queued") else ""
    err = job.get("error")
    if state == "failed" and isinstance(err, Mapping):
        detail = f"{err.get('message', '')}" + (f" -> {err['hint']}" if err.get("hint") else "")
    return [str(job.get("job", "?")), str(job.get("name", "?")), style.state(state),
            str(job.get("stage") or "-"), progress, took, detail]


def jobs_lines(jobs: Sequence[Mapping[str, Any]], style: Style, *, bars: bool, unicode: bool = True,
               now: float | None = None) -> list[str]:
    now = time.time() if now is None else now
    rows = [job_cells(j, style, now, bars, unicode) for j in jobs]
    return table(("JOB", "NAME", "STATE", "STAGE", "PROGRESS", "TIME", "DETAIL"), rows, style)


def job_line(job: Mapping[str, Any], now: float | None = None) -> str:
    """One plain line for a job's change, for logs and pipes."""
    now = time.time() if now is None else now
    cells = job_cells(job, Style(False), now, False, False)
    return " ".join(c for c in (f"job {cells[0]}", *cells[1:]) if c and c != "-")


def stats_line(done: Mapping[str, Any]) -> str:
    """prompt tokens, generated tokens, prefill and decode speed, load time."""
    def num(key: str) -> float:
        v = done.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0

    prompt, cached, generated = int(num("prompt_tokens")), int(num("cached_tokens")), int(num("completion_tokens"))
    prefilled = int(num("prefill_tokens")) if "prefill_tokens" in done else max(0, prompt - cached)
    prefill_ms, decode_ms = num("prefill_ms"), num("decode_ms")
    parts = [f"{prompt} prompt tokens" + (f" ({cached} cached)" if cached else ""), f"{generated} generated"]
    if prefill_ms > 0:
        parts.append(f"prefill {prefilled / prefill_ms * 1000:.1f} tok/s")
    decode_rate = num("tokens_per_s") or (generated / decode_ms * 1000 if decode_ms > 0 else 0.0)
    parts.append(f"decode {decode_rate:.1f} tok/s")
    parts.append(f"load {num('load_ms') / 1000:.2f} s")
    if num("truncated_tokens"):
        parts.append(f"{int(num('truncated_tokens'))} prompt tokens cut to fit")
    if num("context_shifts"):
        parts.append(f"context shifted {int(num('context_shifts'))}x")
    return ", ".join(parts)


def error_text(message: str, hint: str = "") -> str:
    return f"error: {message}" + (f"\n  -> {hint}" if hint else "")


# -- live output ---------------------------------------------------------------

class LiveBlock:
    """A few lines redrawn in place on a terminal (job progress). Lines are cut
    to the terminal's width so that wrapping cannot break the redraw."""

    def __init__(self, stream: TextIO = sys.stderr):
        self.stream = stream
        self.height = 0

    def update(self, lines: Sequence[str]) -> None:
        width = max(20, shutil.get_terminal_size((100, 24)).columns - 1)
        out = []
        if self.height:
            out.append(f"\x1b[{self.height}F\x1b[J")  # to the block's first line, clear below
        for line in lines:
            out.append(_cut(line, width) + "\n")
        self.stream.write("".join(out))
        self.stream.flush()
        self.height = len(lines)

    def clear(self) -> None:
        if self.height:
            self.stream.write(f"\x1b[{self.height}F\x1b[J")
            self.stream.flush()
            self.height = 0


def _cut(line: str, width: int) -> str:
    if len(_strip(line)) <= width:
        return line
    out, seen, i = [], 0, 0
    while i < len(line) and seen < width - 1:
        if line[i] == "\x1b":
            j = line.find("m", i)
            out.append(line[i:j + 1])
            i = j + 1
        else:
            out.append(line[i])
            seen += 1
            i += 1
    return "".join(out) + "…" + ("\x1b[0m" if "\x1b[" in line else "")


class StatusLine:
    """One line on a terminal's stderr rewritten in place ("loading pico 50%"),
    erased before the answer starts. Silent when stderr is not a terminal."""

    def __init__(self, stream: TextIO = sys.stderr):
        self.stream = stream
        self.enabled = is_tty(stream)
        self.shown = False

    def show(self, text: str) -> None:
        if self.enabled:
            width = max(20, shutil.get_terminal_size((100, 24)).columns - 1)
            self.stream.write("\r\x1b[K" + _cut(text, width))
            self.stream.flush()
            self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False
