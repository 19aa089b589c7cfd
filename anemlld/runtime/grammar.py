"""Constrained decoding: a grammar compiled against the model's own tokenizer
with llguidance, and per request a ``Guide`` the engine asks for a mask
before each token is sampled and tells of each token accepted.

Grammars come from a request's ``format`` (``"json"``: any JSON object; a
dict: a JSON schema) or from a tool call's syntax (anemlld.runtime.tools
builds those, with the tools' parameter schemas embedded). A ``format``'s
JSON is written without optional whitespace, so a model cannot spend its
tokens on spaces; a tool call's may have one space between tokens, as
templates write calls. A schema keyword llguidance does not implement is
refused with a ``bad_request`` naming it; nothing is ignored.

A guided answer ends when the grammar is complete (the engine stops at
once). Its last quarter of ``max_tokens`` (at least 8 tokens) steers to
closing: among the tokens the grammar allows, only those that close the open
string (``"``, then nothing but ``}``/``]``), else those that only close
objects and arrays, else those that end a value with ``,`` (when a required
key or item is still missing), whenever the grammar allows one; otherwise
the grammar gets what it needs (a key's name, a value's first character).
Every step there either closes something or writes what the schema requires, so an answer that can
still be finished in its budget is; one that cannot ends at ``max_tokens``
with ``length``, and nothing claims that text is complete (docs/http.md,
"Structured output").

This runs where the engine runs (the model's worker process): the
tokenizer's llguidance view (about a second for a 4K vocabulary, built once
per model on its first guided request) and each grammar's compile never
hold up another model.
"""
from __future__ import annotations

import json
import logging
import re
import threading
from typing import Any, Iterable

import numpy as np

from shared.errors import AnemllError, BadInput

log = logging.getLogger(__name__)

ANY_OBJECT: dict[str, Any] = {"type": "object"}  # OpenAI's json_object and Ollama's "json"
JSON_OPTIONS = {"whitespace_flexible": False}
# Tool calls: at most one space between JSON tokens, as chat templates write calls
# (`{"name": "f", "arguments": {...}}`) and models trained on them repeat.
CALL_JSON_OPTIONS = {"whitespace_flexible": True, "whitespace_pattern": " ?"}
# Steering to closing, most closing first: inside a string, then outside.
CLOSING = ((re.compile(rb"[\]}]+"), re.compile(rb",.*", re.S)), (re.compile(rb'[^"\\]*"[\]}]*'),))
BIAS = np.array([-np.inf, 0.0], dtype=np.float32)  # by "allowed" bit
_views_lock = threading.Lock()


def schema_of(fmt: Any) -> dict[str, Any]:
    """The JSON schema a request's ``format`` asks for."""
    if fmt == "json":
        return ANY_OBJECT
    if isinstance(fmt, dict):
        return fmt
    raise BadInput(f"format must be \"json\" or a JSON schema (an object), got {json.dumps(fmt)[:60]}",
                   "send format: \"json\" for any JSON object, or the schema itself", code="bad_request")


def json_grammar(fmt: Any) -> str:
    """The llguidance grammar for ``format`` (not yet checked against a tokenizer)."""
    from llguidance import LLMatcher

    try:
        return LLMatcher.grammar_from_json_schema(schema_of(fmt), defaults=JSON_OPTIONS)
    except ValueError as e:
        raise BadInput(f"the JSON schema cannot be read ({e})", "send the schema as a JSON object",
                       code="bad_request") from None


def embedded(schema: dict[str, Any], options: dict[str, Any] = CALL_JSON_OPTIONS) -> str:
    """``schema`` as a Lark rule body, for grammars that embed JSON in other text."""
    return "%json " + json.dumps({"x-guidance": options, **schema})


def lark_grammar(lark: str) -> str:
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_lark(lark)


class Guide:
    """One request's grammar state: ``mask`` the logits, ``accept`` each token
    sampled; ``finished`` once the grammar is complete and allows nothing more."""

    def __init__(self, tokenizer: Any, eos: Iterable[int], grammar: str, budget: int | None = None):
        """``budget``: the answer's max_tokens, for steering to closing at its end (None: never)."""
        from llguidance import LLMatcher

        self.view, self.closers = tokenizer_view(tokenizer, eos)
        self.left = budget
        self.steer_at = max(8, budget // 4) if budget is not None else -1
        self.in_string = self.escaped = False
        failed, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.view)
        if failed:
            raise BadInput(f"the grammar engine (llguidance) cannot use this schema: {'; '.join(messages)}",
                           "remove or rewrite what it names (docs/http.md lists what JSON schemas may use)",
                           code="bad_request")
        self.matcher = LLMatcher(self.view, grammar, log_level=0)
        self._check()

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` with every token the grammar forbids at -inf."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        ones = np.unpackbits(bits, bitorder="little", count=logits.shape[-1])
        allowed = ones.view(bool)
        self._check()
        if self.left is not None and self.left <= self.steer_at:
            for closing in self.closers[int(self.in_string)]:
                steered = allowed[:closing.shape[0]] & closing
                if steered.any():
                    allowed[:] = False
                    allowed[:steered.shape[0]] = steered
                    break
        # Both ways are branch-free per token: a few allowed tokens are copied,
        # many get a 0 / -inf bias (measured on a 128K vocabulary: 4 and 3 times
        # faster than a boolean-indexed assignment, bench/grammar.py).
        if np.count_nonzero(ones) * 8 < ones.shape[0]:
            out = np.full(ones.shape[0], -np.inf, dtype=np.float32)
            np.copyto(out, logits, where=allowed)
            return out
        return np.add(logits, BIAS[ones], dtype=np.float32)

    def accept(self, token: int) -> None:
        self.matcher.consume_token(int(token))
        self._check()
        if self.left is not None:
            self.left -= 1
        for byte in self.view.decode_bytes([int(token)]):  # is a JSON string open after it?
            if self.escaped:
                self.escaped = False
            elif byte == 0x5C and self.in_string:
                self.escaped = True
            elif byte == 0x22:
                self.in_string = not self.in_string

    @property
    def finished(self) -> bool:
        return self.matcher.is_stopped()

    def _check(self) -> None:
        if self.matcher.is_error():
            raise AnemllError(f"constrained decoding failed: {self.matcher.get_error()}",
                              "this is a bug in anemlld or llguidance; send the request without format or "
                              "tools to get an answer meanwhile", code="internal")


def tokenizer_view(tokenizer: Any, eos: Iterable[int]) -> tuple[Any, tuple[tuple[np.ndarray, ...], ...]]:
    """llguidance's view of a Hugging Face tokenizer and the tokens that close
    (``CLOSING``'s shape, as masks), made once per tokenizer."""
    import llguidance.hf

    with _views_lock:
        made = getattr(tokenizer, "_anemll_llguidance", None)
        if made is None:
            try:
                view = llguidance.hf.from_tokenizer(tokenizer, eos_token=sorted(eos))
            except ValueError as e:
                raise BadInput(f"this model's tokenizer cannot be used for constrained decoding ({e})",
                               "structured output needs a fast (tokenizer.json) tokenizer",
                               code="bad_request") from None
            closers = _closers(tokenizer, view)
            made = tokenizer._anemll_llguidance = (view, closers)
        return made


def _closers(tokenizer: Any, view: Any) -> tuple[tuple[np.ndarray, ...], ...]:
    """``CLOSING`` as masks over the vocabulary. Only tokens whose text shows a
    closing character (or a byte token, ``<0x22>``) are decoded to bytes: a
    Python call per token of a 128K vocabulary would take seconds."""
    n = view.vocab_size
    names = tokenizer.convert_ids_to_tokens(list(range(min(n, len(tokenizer)))))
    maybe = [i for i, name in enumerate(names) if name is None or name.startswith("<0x")
             or any(c in name for c in '"]},')]
    masks = tuple(tuple(np.zeros(n, dtype=bool) for _ in where) for where in CLOSING)
    for i in maybe:
        text = view.decode_bytes([i])
        for rxs, arrays in zip(CLOSING, masks):
            for rx, array in zip(rxs, arrays):
                array[i] = bool(rx.fullmatch(text))
    return masks
