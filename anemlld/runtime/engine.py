"""The generation engine: one converted model, any executor.

It owns the tokenizer and chat template, prefill (full batches through
``prefill``, the remainder one token at a time through ``infer``, so nothing
is ever padded into the cache), decoding, sampling, stopping, incremental
detokenization, sessions (a KV state plus the tokens it holds, so a follow-up
turn prefills only what is new), the context window, cancellation and
per-request statistics.

Context window: a prompt that leaves fewer than ``reserve`` free positions
(``min(max_tokens, context_length // 4)``) is cut from the front, keeping a
leading BOS; when decoding fills the cache, the most recent half of the
conversation is kept and prefilled again. Both are reported in the request's
statistics (``truncated_tokens``, ``context_shifts``).
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from anemlld.layout import Layout, read_meta
from anemlld.runtime import executors
from anemlld.runtime.executors import INFER, PREFILL
from anemlld.runtime.sampling import Sampler, SamplingParams
from shared.errors import AnemllError, BadInput

log = logging.getLogger(__name__)


@dataclass
class Stats:
    prompt_tokens: int = 0
    cached_tokens: int = 0      # prompt tokens whose K/V were already in the session
    prefill_tokens: int = 0     # prompt tokens actually run
    completion_tokens: int = 0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    load_ms: float = 0.0
    tokens_per_s: float = 0.0
    done_reason: str = ""       # stop, length, cancelled
    truncated_tokens: int = 0   # dropped from the front of a prompt too long for the context
    context_shifts: int = 0     # times decoding filled the cache and re-prefilled the recent half

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass
class Token:
    text: str
    token_ids: list[int]


@dataclass
class Done:
    text: str
    token_ids: list[int]
    stats: Stats


@dataclass
class Session:
    """A KV-cache state and the tokens whose K/V it holds (positions 0..n-1)."""

    state: Any
    tokens: list[int] = field(default_factory=list)


class Detokenizer:
    """Token ids in, text out as soon as it is complete UTF-8, holding back
    anything that could still turn into a stop string."""

    def __init__(self, tokenizer, stops: tuple[str, ...] = ()):
        self.tok = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.ids: list[int] = []
        self.prefix = self.read = 0  # decode window, as in incremental detokenizers
        self.text = ""               # all text decoded so far
        self.emitted = 0             # how much of it was handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release()

    def _release(self) -> str:
        longest = max((len(s) for s in self.stops), default=0)
        hits = [i for i in (self.text.find(s, max(0, self.emitted - longest)) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            self.stopped = True
        else:
            end = len(self.text) - self._held()
        out = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return out

    def _held(self) -> int:
        """Length of the text's tail that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    best = max(best, k)
                    break
        return best

    def flush(self) -> str:
        """The text held back for a stop string that never came."""
        if self.stopped:
            return ""
        out = self.text[self.emitted:]
        self.emitted = len(self.text)
        return out

    @property
    def answer(self) -> str:
        return self.text[:self.emitted]


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises many types for a bad folder
        raise AnemllError(f"the tokenizer in {folder} cannot be loaded ({e})",
                          "copy tokenizer.json and tokenizer_config.json from the original model into the "
                          "converted folder", stage="load", code="model_failed") from None


def eos_ids(folder: Path, tokenizer) -> set[int]:
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        try:
            value = json.loads((folder / name).read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        if value is not None:
            ids.update(value if isinstance(value, list) else [value])
            break
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


class Engine:
    def __init__(self, model_dir: str | Path, executor: str = "auto",
                 progress: Callable[[str, float], None] | None = None, **executor_options: Any):
        """``progress(part, fraction)`` hears each part as it loads."""
        t = time.perf_counter()
        self.layout: Layout = read_meta(model_dir)
        root = self.layout.root
        tok_dir = root / str(self.layout.params.get("tokenizer_path", "."))
        self.tokenizer = load_tokenizer(tok_dir if tok_dir.is_dir() else root)
        self.eos = eos_ids(root, self.tokenizer)
        self.executor = executors.load(self.layout, executor, progress=progress, **executor_options)
        self.ctx = self.layout.context_length
        self.batch = self.layout.batch_size
        rows = np.arange(self.ctx)
        self.mask = np.where(rows[None, :] <= rows[:, None], 0.0, -np.inf).astype(np.float16)
        self.load_ms = (time.perf_counter() - t) * 1000

    @property
    def name(self) -> str:
        return str(self.layout.info.get("name", self.layout.root.name))

    def new_session(self) -> Session:
        return Session(self.executor.make_state())

    # --- prompts ----------------------------------------------------------
    def encode(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
        if (prompt is None) == (messages is None):
            raise BadInput("give either a prompt or messages", "send one of the two", code="bad_request")
        if prompt is not None:
            return list(self.tokenizer(prompt)["input_ids"])
        if not getattr(self.tokenizer, "chat_template", None):
            raise BadInput("this model has no chat template", "send a plain prompt instead of messages",
                           code="bad_request")
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # jinja errors for malformed messages
            raise BadInput(f"the chat template rejected the messages ({e})",
                           "send messages as a list of {role, content} with roles system/user/assistant",
                           code="bad_request") from None
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # --- running tokens through the cache ------------------------------------
    def feed(self, session: Session, ids: list[int], cancel: threading.Event | None = None) -> np.ndarray | None:
        """Run ``ids`` after the session's cached tokens; logits of the last
        one (None if cancelled). Full batches go through ``prefill`` while
        they fit, the rest one at a time through ``infer``."""
        ex, b = self.executor, self.batch
        ex.bind_thread()
        pos, i, hidden = len(session.tokens), 0, None
        if pos + len(ids) > self.ctx:
            raise AnemllError(f"{pos + len(ids)} tokens do not fit the context of {self.ctx}",
                              "this is an engine bug: the context window should have been managed",
                              code="internal")
        while len(ids) - i >= b and pos + b <= self.ctx:
            if cancel is not None and cancel.is_set():
                return None
            part = ids[i:i + b]
            h = ex.embed(np.asarray([part], dtype=np.int32))
            hidden = ex.ffn(h, np.arange(pos, pos + b), self.mask[None, None, pos:pos + b], pos,
                            session.state, PREFILL)
            session.tokens.extend(part)
            pos, i = pos + b, i + b
        for t in ids[i:]:
            h = ex.embed(np.asarray([[t]], dtype=np.int32))
            hidden = ex.ffn(h, np.asarray([pos]), self.mask[None, None, pos:pos + 1], pos, session.state, INFER)
            session.tokens.append(t)
            pos += 1
        return ex.logits(hidden)

    def _reuse(self, session: Session, ids: list[int]) -> int:
        """Keep the longest cached prefix of ``ids`` (at least one token is
        always run, for its logits); returns how many are reused."""
        n = 0
        for a, c in zip(session.tokens, ids):
            if a != c:
                break
            n += 1
        n = min(n, len(ids) - 1)
        del session.tokens[n:]
        return n

    def _fit(self, ids: list[int], params: SamplingParams) -> tuple[list[int], int]:
        reserve = max(1, min(params.max_tokens, self.ctx // 4))
        room = self.ctx - reserve
        if len(ids) <= room:
            return ids, 0
        keep_bos = bool(ids) and ids[0] == self.tokenizer.bos_token_id
        head = ids[:1] if keep_bos else []
        kept = head + ids[len(ids) - (room - len(head)):]
        return kept, len(ids) - len(kept)

    def _shift(self, session: Session) -> list[int]:
        """The cache is full: the recent half of the conversation, to prefill again."""
        toks = session.tokens
        keep_bos = bool(toks) and toks[0] == self.tokenizer.bos_token_id
        head = toks[:1] if keep_bos else []
        recent = head + toks[len(toks) - (self.ctx // 2 - len(head)):]
        session.tokens = []
        return recent

    # --- generation ---------------------------------------------------------
    def generate(self, prompt: str | None = None, messages: list[dict] | None = None,
                 params: SamplingParams | None = None, session: Session | None = None,
                 cancel: threading.Event | None = None) -> Iterator[Token | Done]:
        """Stream ``Token`` events, then one ``Done`` with the statistics."""
        params = params or SamplingParams()
        session = session or self.new_session()
        stats = Stats()
        ids = self.encode(prompt, messages)
        stats.prompt_tokens = len(ids)
        ids, stats.truncated_tokens = self._fit(ids, params)
        if stats.truncated_tokens:
            session.tokens.clear()
        stats.cached_tokens = self._reuse(session, ids)
        t0 = time.perf_counter()
        todo = ids[stats.cached_tokens:]
        logits = self.feed(session, todo, cancel)
        stats.prefill_tokens = len(todo)
        stats.prefill_ms = (time.perf_counter() - t0) * 1000

        sampler, detok, generated = Sampler(params), Detokenizer(self.tokenizer, params.stop), []
        t1 = time.perf_counter()
        reason = "cancelled" if logits is None else ""
        while not reason:
            token = sampler(logits, session.tokens)
            if token in self.eos:
                reason = "stop"
                break
            generated.append(token)
            text = detok.add(token)
            if text or not detok.stopped:
                yield Token(text, [token])
            if detok.stopped:
                reason = "stop"
            elif len(generated) >= params.max_tokens:
                reason = "length"
            elif cancel is not None and cancel.is_set():
                reason = "cancelled"
            else:
                if len(session.tokens) >= self.ctx:
                    stats.context_shifts += 1
                    logits = self.feed(session, self._shift(session) + [token], cancel)
                else:
                    logits = self.feed(session, [token])
                if logits is None:
                    reason = "cancelled"
        tail = detok.flush()
        if tail:
            yield Token(tail, [])
        stats.decode_ms = (time.perf_counter() - t1) * 1000
        stats.completion_tokens = len(generated)
        stats.tokens_per_s = len(generated) / (stats.decode_ms / 1000) if stats.decode_ms > 0 else 0.0
        stats.done_reason = reason
        yield Done(detok.answer, generated, stats)

    def complete(self, *args, **kw) -> Done:
        """Run :meth:`generate` to the end; the final ``Done``."""
        done = None
        for event in self.generate(*args, **kw):
            done = event
        assert isinstance(done, Done)
        return done
