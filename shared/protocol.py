"""What goes over the wire between anemlld and its clients (docs/protocol.md).

Every message is one ZeroMQ frame holding one msgpack map; never pickle.
Requests carry ``v`` (PROTOCOL_VERSION), ``id`` (the client's string) and
``op``; each op is a small frozen record below, valid by construction, so a
client building ``Generate(...)`` and the daemon decoding a frame run the same
checks. Replies are events: maps with the request's ``id`` and an ``event``.

One encoder/decoder pair per direction:

- client: ``encode_request(req) -> bytes``, ``decode_event(frame) -> Event``
- daemon: ``decode_request(frame, max_bytes) -> Request``, ``encode_event(id, event, **fields) -> bytes``

Decoding never raises anything but ``ProtocolError``: a frame cannot kill its reader.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from shared.errors import AnemllError, BadInput
from shared.options import ConvertOptions, _key_hint, parse_option
from shared.settings import FOREVER, parse_duration
from shared.sidecar import NAME_FORM, NAME_RE

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME_BYTES = 1 << 20  # requests; the daemon's limit is Settings.max_frame_bytes
MAX_EVENT_FRAME_BYTES = 64 << 20  # what a client accepts from the daemon (long model lists)
MAX_ID_CHARS = 128
MAX_NAME_CHARS = 256
MAX_STOP_STRINGS = 16
UINT64_MAX = (1 << 64) - 1
INT32_MAX = (1 << 31) - 1

ERROR_CODES = ("bad_request", "unknown_op", "unsupported_version", "not_found", "busy", "too_large",
               "context_overflow", "model_failed", "internal")
DONE_REASONS = ("stop", "length", "cancelled", "tool_calls")
MODEL_STATES = ("queued", "converting", "ready", "failed", "loaded")
ROLES = ("system", "user", "assistant", "tool")
TOOL_CHOICES = ("auto", "none", "required")  # or {"name": one of the tools}
TOOL_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# Statistics every generate `done` carries, besides done_reason.
GENERATE_STATS = ("prompt_tokens", "cached_tokens", "completion_tokens", "prefill_ms", "decode_ms",
                  "load_ms", "tokens_per_s")


class ProtocolError(AnemllError):
    """A request (or reply) that cannot be honoured, with a stable wire ``code``.
    ``request_id`` is None when the frame had no usable id: such frames are dropped."""

    code = "bad_request"

    def __init__(self, code: str, message: str, request_id: str | None = None, hint: str = "", **fields: Any):
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message, hint, stage="protocol", code=code)
        self.request_id = request_id
        self.fields = fields  # extra event fields, e.g. protocol= for unsupported_version

    def to_frame(self) -> bytes | None:
        """The error event to send back, or None when there is nobody to address it to."""
        if self.request_id is None:
            return None
        return encode_error(self.request_id, self.code, self.message, self.hint, **self.fields)


def _bad(message: str, hint: str = "") -> ProtocolError:
    return ProtocolError("bad_request", message, hint=hint)


# -- field checks: (field name, value) -> normalized value, or ProtocolError --

Check = Callable[[str, Any], Any]


def _string(max_chars: int = MAX_NAME_CHARS, empty: bool = False) -> Check:
    def check(name: str, value: Any) -> str:
        if not isinstance(value, str) or (not value and not empty) or len(value) > max_chars:
            raise _bad(f"field {name!r} must be a {'' if empty else 'non-empty '}string of at most "
                       f"{max_chars} characters, got {_show(value)}")
        return value
    return check


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _bad(f"field {name!r} must be a string, got {_show(value)}")
    return value


def _int(low: int, high: int) -> Check:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _bad(f"field {name!r} must be an integer from {low} to {high}, got {_show(value)}")
        return value
    return check


def _number(low: float, high: float, low_open: bool = False) -> Check:
    def check(name: str, value: Any) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value) if abs(value) < 1e300 else math.inf
            ok = math.isfinite(value) and (low < value if low_open else low <= value) and value <= high
        if not ok:
            span = f"{'above' if low_open else 'at least'} {low:g}"
            span += f" and at most {high:g}" if high < math.inf else ""
            raise _bad(f"field {name!r} must be a number {span}, got {_show(value)}")
        return value
    return check


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(f"field {name!r} must be true or false, got {_show(value)}")
    return value


def _duration(name: str, value: Any) -> float:
    try:
        return parse_duration(value, name)
    except BadInput as e:
        raise _bad(f"field {name!r} must be a duration, got {_show(value)}", e.hint) from None


def _stop(name: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or len(value) > MAX_STOP_STRINGS or not all(
            isinstance(s, str) and 0 < len(s) <= MAX_NAME_CHARS for s in value):
        raise _bad(f"field {name!r} must be a list of at most {MAX_STOP_STRINGS} non-empty strings, "
                   f"got {_show(value)}")
    return tuple(value)


def _messages(name: str, value: Any) -> tuple[dict[str, Any], ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise _bad(f"field {name!r} must be a non-empty list of {{role, content}} maps, got {_show(value)}")
    out = []
    for i, m in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(m, Mapping) or not {"role", "content"} <= set(m) <= {"role", "content", *_MESSAGE_EXTRAS}:
            raise _bad(f"{where} must be a map with the keys 'role' and 'content' (an assistant's also "
                       f"'tool_calls', a tool's 'tool_call_id'), got {_show(m)}")
        if m["role"] not in ROLES or not isinstance(m["content"], str):
            raise _bad(f"{where} needs role one of {', '.join(ROLES)} and a string content, got {_show(m)}")
        message: dict[str, Any] = {"role": m["role"], "content": m["content"]}
        for key in set(m) & set(_MESSAGE_EXTRAS):
            if m["role"] != _MESSAGE_EXTRAS[key]:
                raise _bad(f"{where}.{key} belongs to a message with role {_MESSAGE_EXTRAS[key]!r}")
            message[key] = _tool_calls(f"{where}.{key}", m[key]) if key == "tool_calls" else \
                _string(MAX_ID_CHARS)(f"{where}.{key}", m[key])
        out.append(message)
    return tuple(out)


_MESSAGE_EXTRAS = {"tool_calls": "assistant", "tool_call_id": "tool"}  # key -> the role it belongs to


def _tool_calls(name: str, value: Any) -> list[dict[str, Any]]:
    """An assistant's earlier calls: ``{id?, name, arguments}`` maps, arguments a map."""
    if not isinstance(value, (list, tuple)):
        raise _bad(f"{name} must be a list of {{name, arguments}} maps, got {_show(value)}")
    out = []
    for j, c in enumerate(value):
        if not isinstance(c, Mapping) or not {"name", "arguments"} <= set(c) <= {"id", "name", "arguments"} \
                or not isinstance(c["name"], str) or not isinstance(c["arguments"], Mapping):
            raise _bad(f"{name}[{j}] must be a map of name (a string), arguments (a map) and an optional id, "
                       f"got {_show(c)}")
        call = {"name": c["name"], "arguments": dict(c["arguments"])}
        if c.get("id") is not None:
            call["id"] = _string(MAX_ID_CHARS)(f"{name}[{j}].id", c["id"])
        out.append(call)
    return out


def _format(name: str, value: Any) -> str | dict[str, Any]:
    """``"json"`` (any JSON object) or a JSON schema (a map); the schema is
    compiled, and what it uses checked, where the model runs."""
    if value == "json" or isinstance(value, Mapping):
        return value if isinstance(value, str) else dict(value)
    raise _bad(f"field {name!r} must be \"json\" or a JSON schema (a map), got {_show(value)}")


def _tools(name: str, value: Any) -> tuple[dict[str, Any], ...]:
    """OpenAI's tool list: ``{"type": "function", "function": {name, description?, parameters?}}``."""
    if not isinstance(value, (list, tuple)) or not value:
        raise _bad(f"field {name!r} must be a non-empty list of tools, got {_show(value)}")
    out, names = [], set()
    for i, t in enumerate(value):
        fn = t.get("function") if isinstance(t, Mapping) else None
        if not isinstance(t, Mapping) or t.get("type") != "function" or set(t) - {"type", "function"} \
                or not isinstance(fn, Mapping):
            raise _bad(f"{name}[{i}] must be {{\"type\": \"function\", \"function\": {{name, description, "
                       f"parameters}}}}, got {_show(t)}")
        unknown = set(fn) - {"name", "description", "parameters", "strict"}
        if unknown:
            raise _bad(f"{name}[{i}].function has no field {sorted(unknown)[0]!r}",
                       "a function has name, description, parameters and strict")
        if not isinstance(fn.get("name"), str) or not TOOL_NAME_RE.fullmatch(fn["name"]) or fn["name"] in names:
            raise _bad(f"{name}[{i}].function.name must be a unique name of letters, digits, _ . - (at most 64), "
                       f"got {_show(fn.get('name'))}")
        if not isinstance(fn.get("description", ""), str) or not isinstance(fn.get("parameters", {}), Mapping):
            raise _bad(f"{name}[{i}].function needs a string description and a JSON schema (map) as parameters")
        names.add(fn["name"])
        out.append({"type": "function", "function": {k: fn[k] for k in ("name", "description", "parameters")
                                                     if k in fn}})
    return tuple(out)


def _tool_choice(name: str, value: Any) -> str | dict[str, str]:
    if value in TOOL_CHOICES:
        return value
    if isinstance(value, Mapping) and set(value) == {"name"} and isinstance(value["name"], str):
        return {"name": value["name"]}
    raise _bad(f"field {name!r} must be one of {', '.join(TOOL_CHOICES)} or {{\"name\": a tool's name}}, "
               f"got {_show(value)}")


def _model_name(name: str, value: Any) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise _bad(f"field {name!r} must be a model name ({NAME_FORM}), got {_show(value)}")
    return value


def _path(name: str, value: Any) -> str:
    if not isinstance(value, str) or not os.path.isabs(value) or "\0" in value or len(value) > 4096:
        raise _bad(f"field {name!r} must be an absolute path, got {_show(value)}",
                   "send the full path: the daemon does not share the client's working directory")
    return value


def _convert_options(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise _bad(f"field {name!r} must be a map of [convert] options, got {_show(value)}")
    out = {}
    for key, v in value.items():
        if key not in ConvertOptions.KEYS:
            raise _bad(f"{name} has no option {key!r}", _key_hint(str(key), ConvertOptions.KEYS))
        try:
            out[key] = parse_option(key, v)
        except BadInput as e:
            raise _bad(f"{name}: {e.message}", e.hint) from None
    return out


def _suggest(word: str, choices: tuple[str, ...], what: str) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.7)
    listed = f"{what} are: {', '.join(choices)}"
    return f"did you mean {close[0]!r}? {listed}" if close else listed


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _arg(check: Check, default: Any = dataclasses.MISSING) -> Any:
    """A request field with its check; no default means the field is required."""
    return field(default=default, metadata={"check": check})


# -- requests -----------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Request:
    """Base of every request record: ``id`` plus the op's fields."""

    op: ClassVar[str]
    id: str = _arg(_string(MAX_ID_CHARS))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is None:
                continue  # optional and absent
            object.__setattr__(self, f.name, f.metadata["check"](f.name, value))
        self.check()

    def check(self) -> None:
        """Checks that need several fields together."""


@dataclass(frozen=True, kw_only=True)
class Hello(Request):
    op: ClassVar[str] = "hello"
    client: str | None = _arg(_string(), None)  # e.g. "anemll-chat 0.1.0", for the daemon's log


@dataclass(frozen=True, kw_only=True)
class Models(Request):
    op: ClassVar[str] = "models"


@dataclass(frozen=True, kw_only=True)
class Ps(Request):
    op: ClassVar[str] = "ps"


@dataclass(frozen=True, kw_only=True)
class Jobs(Request):
    op: ClassVar[str] = "jobs"


@dataclass(frozen=True, kw_only=True)
class Watch(Request):
    op: ClassVar[str] = "watch"


@dataclass(frozen=True, kw_only=True)
class Generate(Request):
    op: ClassVar[str] = "generate"
    model: str = _arg(_model_name)
    prompt: str | None = _arg(_text, None)  # raw text, no chat template
    messages: tuple[dict[str, str], ...] | None = _arg(_messages, None)  # through the chat template
    session: str | None = _arg(_string(MAX_ID_CHARS), None)  # reuse this session's KV cache
    max_tokens: int | None = _arg(_int(1, INT32_MAX), None)
    temperature: float | None = _arg(_number(0, math.inf), None)  # 0: greedy
    top_k: int | None = _arg(_int(0, INT32_MAX), None)  # 0: off
    top_p: float | None = _arg(_number(0, 1, low_open=True), None)
    repetition_penalty: float | None = _arg(_number(0, math.inf, low_open=True), None)
    presence_penalty: float | None = _arg(_number(-2, 2), None)  # OpenAI's: minus this once per token generated
    frequency_penalty: float | None = _arg(_number(-2, 2), None)  # ... minus this per time it was generated
    seed: int | None = _arg(_int(0, UINT64_MAX), None)
    stop: tuple[str, ...] = _arg(_stop, ())
    keep_alive: float | None = _arg(_duration, None)  # seconds; FOREVER for -1
    format: str | dict[str, Any] | None = _arg(_format, None)  # "json" or a JSON schema: the answer follows it
    tools: tuple[dict[str, Any], ...] | None = _arg(_tools, None)  # through the chat template; calls in done
    tool_choice: str | dict[str, str] | None = _arg(_tool_choice, None)  # default auto

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise _bad("generate needs exactly one of 'prompt' (raw text) or 'messages' (a chat)")
        if (self.tools or self.tool_choice is not None) and self.messages is None:
            raise _bad("tools need 'messages': the chat template renders them")
        if self.tool_choice is not None and not self.tools:
            raise _bad("tool_choice needs 'tools'")
        if isinstance(self.tool_choice, dict) and self.tool_choice["name"] not in {
                t["function"]["name"] for t in self.tools}:
            raise _bad(f"tool_choice names {self.tool_choice['name']!r}, which is not in tools")
        if self.format is not None and self.tools:
            raise _bad("format together with tools is not implemented", "send either format or tools")

    @property
    def structure(self) -> dict[str, Any] | None:
        """What the engine's guide needs (anemlld.runtime.tools.Structure), None for free text."""
        if self.format is None and not self.tools:
            return None
        return {"format": self.format, "tools": list(self.tools or ()), "tool_choice": self.tool_choice}


@dataclass(frozen=True, kw_only=True)
class Cancel(Request):
    op: ClassVar[str] = "cancel"
    target: str = _arg(_string(MAX_ID_CHARS))  # the id of this client's request to stop


@dataclass(frozen=True, kw_only=True)
class Load(Request):
    op: ClassVar[str] = "load"
    model: str = _arg(_model_name)
    keep_alive: float | None = _arg(_duration, None)


@dataclass(frozen=True, kw_only=True)
class Unload(Request):
    op: ClassVar[str] = "unload"
    model: str = _arg(_model_name)


@dataclass(frozen=True, kw_only=True)
class Pin(Request):
    op: ClassVar[str] = "pin"
    model: str = _arg(_model_name)
    pin: bool = _arg(_bool, True)  # false unpins


@dataclass(frozen=True, kw_only=True)
class Convert(Request):
    op: ClassVar[str] = "convert"
    path: str = _arg(_path)  # a Hugging Face folder on the daemon's machine
    name: str | None = _arg(_model_name, None)  # overrides the sidecar's
    options: dict[str, Any] | None = _arg(_convert_options, None)  # over the sidecar's [convert]


@dataclass(frozen=True, kw_only=True)
class Retry(Request):
    op: ClassVar[str] = "retry"
    name: str = _arg(_model_name)  # a model in the failed folder


REQUESTS: dict[str, type[Request]] = {cls.op: cls for cls in (
    Hello, Models, Ps, Jobs, Watch, Generate, Cancel, Load, Unload, Pin, Convert, Retry)}
# Optional request fields added after version 1 was written, as `hello` lists them
# (a client sends one only to a daemon that lists it; docs/protocol.md, Versioning).
FIELD_CAPABILITIES = ("generate.format", "generate.tools", "generate.tool_choice")


def encode_request(request: Request) -> bytes:
    """The frame for ``request``; fields left at their defaults are not sent."""
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": request.id, "op": request.op}
    for f in dataclasses.fields(request):
        value = getattr(request, f.name)
        if f.name != "id" and value != f.default:
            # -1 is the wire's "forever" (JSON-minded clients cannot send infinity)
            body[f.name] = -1 if value == FOREVER else list(value) if isinstance(value, tuple) else value
    return msgpack.packb(body, use_bin_type=True)


def decode_request(frame: bytes, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Request:
    """The request in ``frame``, or ProtocolError(code, request_id) saying why not."""
    if len(frame) > max_bytes:
        raise ProtocolError("too_large", f"request of {len(frame)} bytes is larger than the {max_bytes} "
                            "bytes allowed", _peek_id(frame),
                            "send a shorter prompt, or raise max_frame_bytes in the daemon's settings.toml")
    msg = _unpack(frame, max_bytes)
    if not isinstance(msg, dict):
        raise _bad(f"a request must be a msgpack map, got {type(msg).__name__}")
    rid = msg.get("id")
    if not isinstance(rid, str) or not 0 < len(rid) <= MAX_ID_CHARS:
        raise _bad(f"field 'id' must be a string of 1 to {MAX_ID_CHARS} characters")
    try:
        return _decode_body(msg, rid)
    except ProtocolError as e:
        e.request_id = rid
        raise
    except Exception as e:  # a bug here must not take the daemon down with it
        raise ProtocolError("internal", f"could not decode the request: {type(e).__name__}: {e}", rid) from e


def _decode_body(msg: dict, rid: str) -> Request:
    if not all(isinstance(k, str) for k in msg):
        raise _bad("field names must be strings")
    if "v" not in msg:
        raise _bad(f"field 'v' (the protocol version, {PROTOCOL_VERSION}) is missing")
    v = msg["v"]
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"field 'v' must be an integer, got {_show(v)}")
    if v != PROTOCOL_VERSION:
        newer = "update anemlld (the daemon)" if v > PROTOCOL_VERSION else "update the client"
        raise ProtocolError("unsupported_version", f"the client speaks protocol {_show(v)}, this daemon "
                            f"speaks {PROTOCOL_VERSION}", hint=newer, protocol=PROTOCOL_VERSION)
    op = msg.get("op")
    if not isinstance(op, str):
        raise _bad(f"field 'op' must be a string, got {_show(op)}")
    cls = REQUESTS.get(op)
    if cls is None:
        raise ProtocolError("unknown_op", f"unknown op {_show(op)}", hint=_suggest(op, tuple(REQUESTS), "ops"))
    fields = {k: val for k, val in msg.items() if k not in ("v", "id", "op")}
    names = tuple(f.name for f in dataclasses.fields(cls) if f.name != "id")
    for key in fields:
        if key not in names:
            raise _bad(f"op {op!r} has no field {_show(key)}",
                       _suggest(key, names, f"{op}'s fields") if names else f"{op} takes no fields")
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING and f.name != "id" and f.name not in fields:
            raise _bad(f"op {op!r} needs field {f.name!r}")
    return cls(id=rid, **fields)


class _Ext:
    """A msgpack extension value: kept as a marker so that the field holding it,
    not the whole frame, is refused (and the sender still gets its answer)."""

    def __init__(self, code: int, data: bytes):
        self.code = code

    def __repr__(self) -> str:
        return f"<msgpack extension type {self.code}>"


def _unpack(frame: bytes, max_bytes: int) -> Any:
    try:
        # every element takes at least one byte, so the frame size bounds every length
        return msgpack.unpackb(frame, raw=False, strict_map_key=True, ext_hook=_Ext,
                               max_str_len=max_bytes, max_bin_len=max_bytes, max_array_len=max_bytes,
                               max_map_len=max_bytes // 2, max_ext_len=max_bytes)
    except Exception as e:  # msgpack raises ValueError subclasses, UnicodeDecodeError, TypeError ...
        raise _bad(f"not a msgpack message: {type(e).__name__}: {str(e)[:200]}") from None


def _peek_id(frame: bytes) -> str | None:
    """The id of an oversized request, read without decoding the rest, so its
    sender gets too_large instead of silence."""
    try:
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max(len(frame), 1), ext_hook=_Ext)
        unpacker.feed(frame)
        for _ in range(min(unpacker.read_map_header(), 64)):
            if unpacker.unpack() == "id":
                rid = unpacker.unpack()
                return rid if isinstance(rid, str) and 0 < len(rid) <= MAX_ID_CHARS else None
            unpacker.skip()
    except Exception:
        pass
    return None


# -- events -------------------------------------------------------------------

# event -> the fields it always carries (besides id and event)
EVENTS: dict[str, tuple[str, ...]] = {
    "ok": (),  # load, unload, pin, cancel, convert, retry
    "token": ("text", "token_ids"),
    "done": ("done_reason",),  # a generate's also carries GENERATE_STATS
    "progress": ("kind", "model", "stage", "fraction"),  # kind: "load" or "convert"
    "model": ("model",),  # watch: a model record whose state changed
    "error": ("code", "message"),
    "hello": ("server", "version", "protocol", "capabilities", "max_frame_bytes"),
    "models": ("models",),
    "ps": ("ps",),
    "jobs": ("jobs",),
}
# After one of these nothing more comes for that id.
FINAL_EVENTS = frozenset({"ok", "done", "error", "hello", "models", "ps", "jobs"})


def encode_event(request_id: str | None, event: str, **fields: Any) -> bytes:
    """The frame for one event; raises ValueError for a malformed event (a daemon bug)."""
    if event not in EVENTS:
        raise ValueError(f"unknown event {event!r}")
    missing = [k for k in EVENTS[event] if k not in fields]
    if missing:
        raise ValueError(f"event {event!r} needs {', '.join(missing)}")
    if event == "error" and fields["code"] not in ERROR_CODES:
        raise ValueError(f"unknown error code {fields['code']!r}")
    if event == "done" and fields["done_reason"] not in DONE_REASONS:
        raise ValueError(f"unknown done_reason {fields['done_reason']!r}")
    return msgpack.packb({"id": request_id, "event": event, **fields}, use_bin_type=True)


def encode_error(request_id: str | None, code: str, message: str, hint: str = "", **fields: Any) -> bytes:
    if hint:
        fields["hint"] = hint
    return encode_event(request_id, "error", code=code, message=message, **fields)


@dataclass(frozen=True)
class Event:
    """One decoded reply: ``id`` of the request it answers, ``event`` and its fields."""

    id: str | None
    event: str
    data: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    @property
    def final(self) -> bool:
        return self.event in FINAL_EVENTS

    def raise_for_error(self) -> None:
        if self.event == "error":
            raise ProtocolError(self.data["code"] if self.data.get("code") in ERROR_CODES else "internal",
                                str(self.data.get("message", "")), self.id, str(self.data.get("hint", "")))


def decode_event(frame: bytes, max_bytes: int = MAX_EVENT_FRAME_BYTES) -> Event:
    """A reply from the daemon. Unknown events are returned as they are (a newer
    daemon may add some); callers skip what they do not know."""
    if len(frame) > max_bytes:
        raise ProtocolError("too_large", f"reply of {len(frame)} bytes is larger than {max_bytes}")
    msg = _unpack(frame, max_bytes)
    if not isinstance(msg, dict) or not isinstance(msg.get("event"), str):
        raise _bad("a reply must be a msgpack map with a string 'event'")
    rid = msg.get("id")
    if rid is not None and not isinstance(rid, str):
        raise _bad("a reply's 'id' must be a string or nil")
    data = {k: v for k, v in msg.items() if k not in ("id", "event")}
    if not all(isinstance(k, str) for k in data):
        raise _bad("field names must be strings")
    return Event(rid, msg["event"], data)
