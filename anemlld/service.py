"""The daemon's operations, once, for every transport: the ZeroMQ server and
the HTTP dialects (OpenAI, Ollama) are thin translations onto this layer, as
vLLM's engine client is onto its engine. Nothing here knows about sockets,
frames, JSON or status codes.

Requests are the protocol's records (``shared.protocol.Generate`` and
friends), so a request is checked the same way whichever door it came in by.
Errors are ``AnemllError`` with the protocol's codes; ``NotReady`` marks a
model that exists but is still being converted (HTTP answers it with 503 and
``Retry-After``, the socket with ``not_found`` as it always has).

A generation reports to a ``Sink`` from the model's worker thread:
``progress`` while the model loads, ``token`` per token, then exactly one of
``done`` (with the statistics) or ``error``. ``Generation.cancel`` stops it
between tokens, or takes it out of the queue before it runs.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Protocol

from anemlld import __version__
from anemlld.registry import ModelEntry, Registry
from anemlld.residency import ResidentModel, Residency
from shared import protocol as p
from shared.errors import AnemllError
from shared.settings import Settings

log = logging.getLogger(__name__)

CONVERTING = ("queued", "converting")
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty", "seed")


class NotReady(AnemllError):
    """The model is known but still being converted: ask again later."""

    def __init__(self, message: str, hint: str, retry_after: float = 5.0):
        super().__init__(message, hint, code="not_found")
        self.retry_after = retry_after


class Sink(Protocol):
    """Where a generation's events go; called from the model's worker thread.
    Implementations must not raise."""

    def progress(self, part: str, fraction: float) -> None: ...
    def token(self, text: str, token_ids: list[int]) -> None: ...
    def done(self, fields: dict[str, Any]) -> None: ...
    def error(self, error: AnemllError) -> None: ...


class Generation:
    """A submitted generation; ``cancel`` is safe from any thread, any number of times."""

    def __init__(self, sink: Sink):
        self._sink = sink
        self._cancel = threading.Event()
        self._ticket: Any = None

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        self._cancel.set()  # a running generation stops before its next token
        if self._ticket is not None and self._ticket.withdraw():  # still queued: it never runs
            _safe(self._sink.done, zero_stats(reason="cancelled"))


class Service:
    def __init__(self, settings: Settings, registry: Registry, residency: Residency, jobs: Any = None):
        self.settings = settings
        self.registry = registry
        self.residency = residency
        self.jobs = jobs
        self.http_url: str | None = None  # set by the daemon once HTTP is bound

    @property
    def version(self) -> str:
        return __version__

    # -- models ------------------------------------------------------------------
    def models(self) -> list[dict[str, Any]]:
        """Every model, as the `models` reply lists it (state ``loaded`` only while resident)."""
        return [self.record(e) for e in self.registry.all()]

    def record(self, entry: ModelEntry) -> dict[str, Any]:
        record = wire_safe(entry.to_wire())
        if self.residency.is_loaded(entry.name):
            record["state"] = "loaded"
        elif record["state"] == "loaded":
            record["state"] = "ready"
        return record

    def entry(self, name: str) -> ModelEntry:
        """The model named ``name``, or ``not_found`` listing the known ones."""
        entry = self.registry.get(name)
        if entry is None:
            known = ", ".join(e.name for e in self.registry.all()) or "none yet"
            raise AnemllError(f"no model named {name!r}", f"models: {known}", code="not_found")
        return entry

    def details(self, name: str) -> dict[str, Any]:
        """What a client shows about a model: its record plus what the converted
        folder says (architecture, context, chunks, LUT bits, chat template)."""
        entry = self.entry(name)
        out: dict[str, Any] = {"record": self.record(entry), "modified_at": None, "architecture": None,
                               "params": {}, "chat_template": "", "generation_config": {}}
        if not entry.path:
            return out
        from anemlld.layout import read_meta  # yaml only; no torch

        root = Path(entry.path)
        try:
            layout = read_meta(root)
            out["architecture"] = layout.architecture
            out["params"] = wire_safe(dict(layout.params))
            out["modified_at"] = (root / "meta.yaml").stat().st_mtime
        except (AnemllError, OSError) as e:
            log.debug("cannot read %s's meta.yaml: %s", name, e)
        out["chat_template"] = _chat_template(root)
        out["generation_config"] = _json_file(root / "generation_config.json")
        return out

    def servable(self, name: str) -> ModelEntry:
        """``entry`` for a request that needs the model converted; ``NotReady``
        with the conversion's stage while it is not."""
        entry = self.entry(name)
        if entry.state in CONVERTING:
            job = self._job_of(name)
            where = f" (stage {job['stage'] or 'waiting'}, {float(job['fraction']) * 100:.0f}%)" if job else ""
            raise NotReady(f"model {name!r} is {entry.state}{where}, not ready yet",
                           "ask again when the conversion is done; `anemll-chat --jobs --watch` follows it")
        return entry

    def ps(self) -> list[dict[str, Any]]:
        return self.residency.ps()

    def jobs_list(self) -> list[Any]:
        return wire_safe(list(self.jobs.list())) if self.jobs is not None else []

    # -- residency -----------------------------------------------------------------
    def load(self, name: str, keep_alive: float | None = None,
             progress: Callable[[str, float], None] | None = None) -> None:
        """Load ``name`` and wait until it is resident (blocking). A model marked
        failed because its worker kept dying is tried again."""
        self.entry(name)
        self.residency.forgive(name)
        self.servable(name)
        self.residency.acquire(name, progress, keep_alive)

    def unload(self, name: str) -> bool:
        self.entry(name)
        return self.residency.unload(name)

    def pin(self, name: str, pin: bool, progress: Callable[[str, float], None] | None = None) -> None:
        """Pin (loading it, blocking) or unpin ``name``."""
        self.servable(name) if pin else self.entry(name)
        self.residency.pin(name, pin, progress)

    # -- conversions -----------------------------------------------------------------
    def convert(self, path: str, name: str | None = None, options: dict | None = None) -> dict[str, Any]:
        extra = {k: v for k, v in (("name", name), ("options", options)) if v is not None}
        return _job_reply(_call_jobs(self._jobs().convert_path, path, **extra), name)

    def retry(self, name: str) -> dict[str, Any]:
        """Convert a failed model again; one that failed because its worker kept
        dying needs no conversion: it is servable again (``job`` is None)."""
        if self.residency.forgive(name):
            return {"job": None, "name": name}
        return _job_reply(_call_jobs(self._jobs().retry, name), name)

    def _jobs(self) -> Any:
        if self.jobs is None:
            raise AnemllError("this daemon does not run conversion jobs",
                              "use an anemlld started with its drop folder and jobs", code="bad_request")
        return self.jobs

    def _job_of(self, name: str) -> dict[str, Any] | None:
        if self.jobs is None:
            return None
        try:
            jobs = [j for j in self.jobs_list() if isinstance(j, Mapping) and j.get("name") == name]
        except Exception:
            log.exception("listing jobs failed")
            return None
        return jobs[-1] if jobs else None

    # -- generation ------------------------------------------------------------------
    def generate(self, req: p.Generate, sink: Sink) -> Generation:
        """Queue ``req`` on its model (loading it first if needed). Raises at once
        what makes it impossible (no such model, still converting, queue full);
        everything later goes to ``sink``."""
        self.servable(req.model)
        options = {k: getattr(req, k) for k in SAMPLING_FIELDS if getattr(req, k) is not None}
        if req.stop:
            options["stop"] = tuple(req.stop)
        messages = [dict(m) for m in req.messages] if req.messages is not None else None
        generation = Generation(sink)
        cancel = generation._cancel

        def run(model: ResidentModel, load_ms: float) -> None:
            if cancel.is_set():
                _safe(sink.done, zero_stats(load_ms, "cancelled"))
                return
            try:
                for event in model.generate(prompt=req.prompt, messages=messages, options=options,
                                            session_id=req.session, cancel=cancel, structure=req.structure):
                    if hasattr(event, "stats"):
                        _safe(sink.done, done_fields(event.stats, load_ms, getattr(event, "tool_calls", None)))
                    else:
                        _safe(sink.token, event.text, event.token_ids)
            except Exception as e:
                if not isinstance(e, AnemllError):
                    log.exception("generate %r on %s failed", req.id, req.model)
                _safe(sink.error, as_anemll_error(e))

        generation._ticket = self.residency.submit(
            req.model, run, lambda error: _safe(sink.error, error), keep_alive=req.keep_alive,
            on_progress=lambda part, fraction: _safe(sink.progress, part, round(float(fraction), 4)))
        return generation


# -- helpers every transport uses ------------------------------------------------------

def zero_stats(load_ms: float = 0.0, reason: str = "cancelled") -> dict[str, Any]:
    stats: dict[str, Any] = {k: 0 for k in p.GENERATE_STATS}
    stats.update(prefill_ms=0.0, decode_ms=0.0, tokens_per_s=0.0, load_ms=round(load_ms, 2), done_reason=reason)
    return stats


def done_fields(stats: Any, load_ms: float, tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    values = stats.as_dict() if hasattr(stats, "as_dict") else dataclasses.asdict(stats)
    fields = {**zero_stats(), **values}
    reason = fields.get("done_reason") or "stop"
    fields["done_reason"] = reason if reason in p.DONE_REASONS else "stop"
    fields["load_ms"] = round(load_ms, 2)
    if tool_calls:
        fields["tool_calls"] = tool_calls
    return wire_safe(fields)


def as_anemll_error(error: BaseException) -> AnemllError:
    if isinstance(error, AnemllError):
        return error
    return AnemllError(f"{type(error).__name__}: {error}",
                       "this is a bug in anemlld; its log has the details (look for the traceback)",
                       code="internal")


def wire_safe(value: Any) -> Any:
    """Plain msgpack/JSON types: paths as str, records and tuples as maps and lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): wire_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [wire_safe(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (str, int, float, bool, bytes)):
        return value
    return str(value)


def _safe(fn: Callable[..., None], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("delivering a generation event failed")


def _call_jobs(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Jobs' own errors as protocol errors: what does not exist is not_found,
    what cannot work is bad_request."""
    try:
        return method(*args, **kwargs)
    except AnemllError:
        raise
    except (FileNotFoundError, KeyError, LookupError) as e:
        raise AnemllError(str(e).strip("'\""), "check the name or path", code="not_found") from None
    except (ValueError, NotADirectoryError) as e:
        raise AnemllError(str(e), "check the request", code="bad_request") from None


def _job_reply(result: Any, name: str | None) -> dict[str, Any]:
    if isinstance(result, Mapping):
        return wire_safe({"job": result.get("job", result.get("id")), "name": result.get("name", name)})
    if isinstance(result, int) and not isinstance(result, bool):
        return {"job": result, "name": name}
    if result is not None:
        return wire_safe({"job": getattr(result, "job", getattr(result, "id", None)),
                          "name": getattr(result, "name", name)})
    return {"job": None, "name": name}


def _json_file(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _chat_template(root: Path) -> str:
    """The chat template's text, from chat_template.jinja or tokenizer_config.json."""
    try:
        return (root / "chat_template.jinja").read_text()
    except OSError:
        pass
    template = _json_file(root / "tokenizer_config.json").get("chat_template", "")
    return template if isinstance(template, str) else json.dumps(template)
