"""Tool calls in the model's own syntax: which syntax a chat template
teaches, the grammar that forces a call (with the tools' parameter schemas
inside), the guide that constrains a call once the answer has begun one,
and reading the calls back out of the answer.

The syntax is read from the template's text, not from the architecture,
since fine-tunes mix them:

- ``hermes``: the template writes ``<tool_call>`` (Qwen 2.5 and 3, Hermes,
  many fine-tunes): each call is ``<tool_call>\\n{"name": ..., "arguments":
  {...}}\\n</tool_call>``, after optional text.
- ``llama3``: the template writes calls as ``{"name": ..., "parameters":
  ...}`` JSON (Llama 3.1, 3.2, 3.3): the whole answer is the call.

A template with neither has no tool support, and a request with tools is
refused. Calls travel as ``{"id", "name", "arguments"}`` maps (arguments a
map); ``tool_choice`` is ``auto``, ``none``, ``required`` or
``{"name": ...}`` (docs/protocol.md).
"""
from __future__ import annotations

import json
import logging
import re
import secrets
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from anemlld.runtime import grammar
from shared.errors import AnemllError, BadInput

log = logging.getLogger(__name__)

HERMES, LLAMA3 = "hermes", "llama3"
OPEN, CLOSE = "<tool_call>", "</tool_call>"
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def form_of(template: Any) -> str | None:
    """The tool-call syntax a chat template writes, or None if it has none."""
    if not isinstance(template, str) or "tools" not in template:
        return None
    if OPEN in template:
        return HERMES
    if '"parameters": ' in template:
        return LLAMA3
    return None


@dataclass
class ToolUse:
    """One request's tools: what the template is given, the guide, the parse."""

    form: str
    tools: list[dict[str, Any]]
    choice: Any = "auto"

    @classmethod
    def of(cls, tokenizer: Any, tools: list[dict[str, Any]], choice: Any) -> "ToolUse":
        form = form_of(getattr(tokenizer, "chat_template", None))
        if form is None:
            raise BadInput("this model's chat template has no tool support (it writes no <tool_call> and no "
                           "Llama 3 JSON call)", "send the request without tools, or use a model whose chat "
                           "template renders tools (Qwen 2.5 or 3, Llama 3.1 or later)", code="bad_request")
        use = cls(form, tools, choice or "auto")
        if isinstance(use.choice, dict) and use.choice.get("name") not in use.names:
            raise BadInput(f"tool_choice names {use.choice.get('name')!r}, which is not in tools",
                           f"name one of: {', '.join(use.names)}", code="bad_request")
        return use

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    # -- the grammar ------------------------------------------------------------------
    def call_schema(self, only: str | None = None) -> dict[str, Any]:
        """A JSON schema matching one call of any tool (or of ``only``) in this syntax."""
        key = "arguments" if self.form == HERMES else "parameters"
        options = []
        for tool in self.tools:
            fn = tool["function"]
            if only is not None and fn["name"] != only:
                continue
            params = fn.get("parameters") or {"type": "object", "properties": {}}
            options.append({"type": "object", "properties": {"name": {"const": fn["name"]}, key: params},
                            "required": ["name", key], "additionalProperties": False})
        return options[0] if len(options) == 1 else {"anyOf": options}

    def lark(self, only: str | None = None, loose: bool = False) -> str:
        """One call: exactly as the template writes it when forced, with any
        whitespace around it when the model began it itself (``loose``)."""
        body = "body: " + grammar.embedded(self.call_schema(only))
        if self.form == LLAMA3:
            return ("start: /[ \\t\\r\\n]*/ body\n" if loose else "start: body\n") + body
        if loose:
            return f'start: /[ \\t\\r\\n]*/ "{OPEN}" /[ \\t\\r\\n]*/ body /[ \\t\\r\\n]*/ "{CLOSE}"\n' + body
        return f'start: "{OPEN}\\n" body "\\n{CLOSE}"\n' + body

    def guide(self, tokenizer: Any, eos: Iterable[int], budget: int) -> Any:
        """The engine's guide for this request (None: free text); ``budget`` is max_tokens."""
        if self.choice == "none":
            return None
        if self.choice == "auto":
            return Begun(tokenizer, eos, self, budget)
        only = self.choice.get("name") if isinstance(self.choice, dict) else None
        return grammar.Guide(tokenizer, eos, grammar.lark_grammar(self.lark(only)), budget)

    # -- the answer ---------------------------------------------------------------------
    @property
    def opening(self) -> str:
        return OPEN if self.form == HERMES else "{"

    def parse(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """The answer's text outside its calls, and the calls (none if the
        answer holds no complete, well-formed one)."""
        if self.choice == "none":
            return text, []
        if self.form == HERMES:
            calls = [_call(body, "arguments") for body in _HERMES_CALL.findall(text)]
            if calls and None not in calls:
                return _HERMES_CALL.sub("", text).strip(), calls
            return text, []
        body = text.strip().removeprefix("<|python_tag|>")
        if not body.startswith("{"):
            return text, []
        calls = [_call(part, "parameters") for part in body.split(";")]
        return ("", calls) if calls and None not in calls else (text, [])

    def held(self, text: str) -> int:
        """Where in ``text`` a call begins or may still begin: text from there is
        held back from the stream until the answer is parsed."""
        if self.choice == "none":
            return len(text)
        if self.form == LLAMA3:
            stripped = text.lstrip()
            return 0 if not stripped or stripped.startswith("{") or "<|python_tag|>".startswith(stripped) \
                else len(text)
        at = text.find(OPEN)
        if at >= 0:
            return at
        for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
            if text.endswith(OPEN[:k]):
                return len(text) - k
        return len(text)

    def stream(self, events: Iterator[Any]) -> Iterator[Any]:
        """The engine's events with call text held back; the final Done carries
        the calls and ``done_reason`` ``tool_calls`` when there are any."""
        text, sent, token = "", 0, None
        for event in events:
            if not hasattr(event, "stats"):
                token = type(event)  # the engine's Token
                text += event.text
                end = max(sent, self.held(text))
                if end > sent or event.token_ids:
                    yield token(text[sent:end], event.token_ids)
                    sent = end
                continue
            _, calls = self.parse(event.text)
            if calls:  # what was streamed is the content; the calls go with Done
                event.text, event.tool_calls = text[:sent].strip(), calls
                if event.stats.done_reason in ("stop", "length"):
                    event.stats.done_reason = "tool_calls"
            elif text[sent:]:
                yield token(text[sent:], [])
            yield event


class Begun:
    """``tool_choice: auto``: free text, unless the answer opens a call; from
    its opening on, the call grammar (the tokens so far caught up)."""

    def __init__(self, tokenizer: Any, eos: Iterable[int], use: ToolUse, budget: int):
        self.tokenizer, self.eos, self.use, self.budget = tokenizer, tuple(eos), use, budget
        self.grammar = grammar.lark_grammar(use.lark(loose=True))
        grammar.Guide(tokenizer, self.eos, self.grammar)  # a schema it cannot do is refused now, not mid-answer
        self.tokens: list[int] = []
        self.inner: grammar.Guide | None = None
        self.free = False

    def mask(self, logits):
        return self.inner.mask(logits) if self.inner is not None else logits

    def accept(self, token: int) -> None:
        if self.inner is not None:
            self.inner.accept(token)
            return
        if self.free:
            return
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=False).lstrip()
        opening = self.use.opening
        if text.startswith(opening):
            inner = grammar.Guide(self.tokenizer, self.eos, self.grammar, self.budget)
            try:
                for t in self.tokens:
                    inner.accept(t)
            except AnemllError:  # the opening token carried text no call allows: the answer is text
                log.info("an answer began like a tool call and went on as text: not constrained")
                self.free = True
                return
            self.inner = inner
        elif not opening.startswith(text):
            self.free = True

    @property
    def finished(self) -> bool:
        return self.inner is not None and self.inner.finished


def _call(body: str, key: str) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = value.get(key, value.get("arguments", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return {"id": "call_" + secrets.token_hex(12), "name": value["name"], "arguments": args}


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Protocol messages in the shape chat templates read: an assistant's
    calls as ``{"type": "function", "function": {"name", "arguments"}}``."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{"id": c.get("id", f"call_{i}"), "type": "function",
                                "function": {"name": c["name"], "arguments": c["arguments"]}}
                               for i, c in enumerate(m["tool_calls"])]
        out.append(m)
    return out


@dataclass
class Structure:
    """What a request's ``format``, ``tools`` and ``tool_choice`` ask of the
    engine: the tools for the chat template, the guide, the answer's reading."""

    guide: Any = None
    use: ToolUse | None = None

    @property
    def tools(self) -> list[dict[str, Any]] | None:
        return self.use.tools if self.use is not None else None

    def stream(self, events: Iterator[Any]) -> Iterator[Any]:
        return self.use.stream(events) if self.use is not None else events

    @classmethod
    def of(cls, tokenizer: Any, eos: Iterable[int], spec: dict[str, Any] | None, budget: int) -> "Structure":
        """``budget``: the request's max_tokens (a guide steers to closing near its end)."""
        spec = spec or {}
        fmt, tools = spec.get("format"), spec.get("tools")
        if fmt is not None and tools:
            raise BadInput("format together with tools is not implemented",
                           "send either a format (a JSON answer) or tools (tool calls)", code="bad_request")
        if fmt is not None:
            return cls(grammar.Guide(tokenizer, eos, grammar.json_grammar(fmt), budget))
        if tools:
            use = ToolUse.of(tokenizer, list(tools), spec.get("tool_choice"))
            return cls(use.guide(tokenizer, eos, budget), use)
        return cls()
