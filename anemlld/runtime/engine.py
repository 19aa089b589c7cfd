"""The generation engine: one converted model, any executor.

It owns the tokenizer and chat template, prefill (full batches through
``prefill``, the remainder one token at a time through ``infer``, so nothing
is ever padded into the cache; in models with sliding-window layers, whose
K/V live in ring caches, batches start at multiples of the batch size and the
tokens before go through ``infer``: runtime/attention.py has the inputs each
step takes; in ANEMLL's Gemma 3, whose local caches shift, the function for
each position is runtime/rotation.py's choice), decoding, sampling, stopping, incremental
detokenization, reuse of a session's cached prefix (a KV state plus the
tokens it holds, so a follow-up turn prefills only what is new; which state a
request gets is the prefix cache's choice), the context window, cancellation,
per-request statistics, and what the model folder says about sampling
(``generation_config.json``) and the size of one KV state.

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from anemlld.layout import Layout, read_meta
from anemlld.runtime import executors
from anemlld.runtime.attention import Steps
from anemlld.runtime.executors import INFER, PREFILL
from anemlld.runtime.prefix_cache import Session, reusable
from anemlld.runtime.rotation import Rotation
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
    predictions: int = 0        # model calls (one per part; a monolithic model is one part)
    predictions_per_token: float = 0.0  # of them, per token run while decoding

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
    tool_calls: list[dict[str, Any]] | None = None  # read from the answer (anemlld.runtime.tools)


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
    return ids | end_of_turn_ids(tokenizer)


def end_of_turn_ids(tokenizer) -> set[int]:
    """The special tokens the chat template writes right after a message's
    content (``<|eot_id|>``, ``<|im_end|>``, ``<end_of_turn>``, ``<|end|>``):
    a model ends its turn with them. Folders without a generation_config.json
    (ANEMLL 0.3.4's) name no other end of turn than the tokenizer's EOS."""
    import re

    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return set()
    found = set()
    for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
        text = getattr(token, "content", str(token))
        after_content = r"content[\]'\"]*(?:\s*\|\s*\w+)*\s*(?:\+\s*['\"]|-?\}\})" + re.escape(text)
        if getattr(token, "special", True) and re.search(after_content, template):
            found.add(int(token_id))
    return found


def sampling_defaults(folder: Path) -> dict[str, Any]:
    """The ``SamplingParams`` fields that ``generation_config.json`` sets, read
    as transformers reads it: without ``do_sample: true`` generation is greedy
    whatever temperature the file names (and with it and no temperature, 1.0).
    Only what the file has; values SamplingParams refuses are left out, with a
    warning."""
    path = folder / "generation_config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring %s: %s", path, e)
        return {}
    if not isinstance(config, dict):
        log.warning("ignoring %s: not a JSON object", path)
        return {}
    found: dict[str, Any] = {"temperature": config.get("temperature", 1.0) if config.get("do_sample") is True
                             else 0.0}
    for ours, theirs in (("top_k", "top_k"), ("top_p", "top_p"), ("repetition_penalty", "repetition_penalty"),
                         ("max_tokens", "max_new_tokens")):
        if config.get(theirs) is not None:
            found[ours] = config[theirs]
    defaults = {}
    for key, value in found.items():
        whole = key in ("top_k", "max_tokens")
        try:
            if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
                raise TypeError
            SamplingParams(**{key: value})
        except (TypeError, BadInput):
            log.warning("ignoring %s = %r in %s: not a valid %s", key, value, path, key)
            continue
        defaults[key] = value if whole else float(value)
    return defaults


def kv_state_bytes(folder: Path, layout: Layout) -> int | None:
    """Bytes of one KV state, from the shape every converted model shares,
    ``(2 * layers, kv_heads, state_length, head_dim)`` in fp16, where the
    layers meta.yaml lists as ``local_layers`` keep ``ring_size`` slots
    instead (in ANEMLL's Gemma 3, config.json's ``sliding_attention`` layers
    keep ``sliding_window``); None if the folder's config.json does not say."""
    try:
        config = json.loads((folder / "config.json").read_text())
        config = config.get("text_config", config)
        heads = int(config["num_attention_heads"])
        layers = int(config["num_hidden_layers"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
        length = int(layout.params.get("state_length", layout.context_length))
        local = len(layout.params.get("local_layers") or []) if layout.ring_size else 0
        local_slots = layout.ring_size or 0
        if layout.rotation_window:
            local = list(config.get("layer_types") or []).count("sliding_attention")
            local_slots = layout.rotation_window
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError):
        return None
    slots = (layers - local) * length + local * local_slots
    return 2 * kv_heads * slots * head_dim * 2


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
        self.sampling_defaults: dict[str, Any] = sampling_defaults(root)  # a request's options override these
        self.state_bytes: int | None = kv_state_bytes(root, self.layout)
        self.executor = executors.load(self.layout, executor, progress=progress, **executor_options)
        self.ctx = self.layout.context_length
        self.batch = self.layout.batch_size
        self.steps = Steps.of(self.layout)
        # A ring is written in whole batches from multiples of the batch size.
        self.align = self.batch if self.steps.ring else 1
        self.rotation = Rotation.of(self.layout)  # ANEMLL's Gemma 3: which function runs each position
        self.load_ms = (time.perf_counter() - t) * 1000

    @property
    def name(self) -> str:
        return str(self.layout.info.get("name", self.layout.root.name))

    def new_session(self) -> Session:
        ring = self.steps.new_ring() if self.rotation is None else self.rotation.new_cache()
        return Session(self.executor.make_state(), ring=ring)

    # --- prompts ----------------------------------------------------------
    def encode(self, prompt: str | None = None, messages: list[dict] | None = None,
               tools: list[dict] | None = None) -> list[int]:
        if (prompt is None) == (messages is None):
            raise BadInput("give either a prompt or messages", "send one of the two", code="bad_request")
        if prompt is not None:
            return list(self.tokenizer(prompt)["input_ids"])
        if not getattr(self.tokenizer, "chat_template", None):
            raise BadInput("this model has no chat template", "send a plain prompt instead of messages",
                           code="bad_request")
        try:
            text = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                      tokenize=False)
        except Exception as e:  # jinja errors for malformed messages
            raise BadInput(f"the chat template rejected the messages ({e})",
                           "send messages as a list of {role, content} with roles system/user/assistant",
                           code="bad_request") from None
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # --- running tokens through the cache ------------------------------------
    def feed(self, session: Session, ids: list[int], cancel: threading.Event | None = None,
             greedy: bool = False) -> np.ndarray | int | None:
        """Run ``ids`` after the session's cached tokens; logits of the last
        one, or with ``greedy`` its most likely next token (None if
        cancelled). Full batches go through ``prefill`` while they fit, the
        rest one at a time through ``infer``; with a ring, the tokens before
        the first multiple of the batch size go through ``infer`` too, so that
        batches start there."""
        ex, b = self.executor, self.batch
        ex.bind_thread()
        pos, i, hidden = len(session.tokens), 0, None
        if pos + len(ids) > self.ctx:
            raise AnemllError(f"{pos + len(ids)} tokens do not fit the context of {self.ctx}",
                              "this is an engine bug: the context window should have been managed",
                              code="internal")
        while i < len(ids) and pos % self.align:
            hidden = self._infer(session, ids[i], pos)
            pos, i = pos + 1, i + 1
        while self._prefills(pos, len(ids) - i):
            if cancel is not None and cancel.is_set():
                return None
            part = ids[i:i + b]
            h = ex.embed(np.asarray([part], dtype=np.int32))
            hidden = ex.ffn(h, self.steps.step(pos, b, session.ring), session.state, PREFILL)
            session.tokens.extend(part)
            pos, i = pos + b, i + b
        for t in ids[i:]:
            hidden = self._infer(session, t, pos)
            pos += 1
        return ex.argmax(hidden) if greedy else ex.logits(hidden)

    def _prefills(self, pos: int, left: int) -> bool:
        """Whether the next ``left`` tokens at ``pos`` start with a prefill
        batch. ANEMLL's Gemma 3 prefills only below its window, and never
        the last token: its prefill returns no row to take logits from."""
        b = self.batch
        if self.rotation is not None:
            return left > b and self.rotation.prefills(pos, b)
        return left >= b and pos + b <= self.ctx

    def _infer(self, session: Session, token: int, pos: int):
        h = self.executor.embed(np.asarray([[token]], dtype=np.int32))
        function = INFER if self.rotation is None else self.rotation.infer_function(pos)
        hidden = self.executor.ffn(h, self.steps.step(pos, 1, session.ring), session.state, function)
        session.tokens.append(token)
        return hidden

    def _reuse(self, session: Session, ids: list[int]) -> int:
        """Keep the longest cached prefix of ``ids`` (at least one token is
        always run, for its logits; with a ring, only as far back as it still
        holds the keys the next token needs); returns how many are reused. The
        K/V past it stay in the state but are masked until overwritten."""
        n = max(0, reusable(session.tokens, ids, session.ring))
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
    def _head_argmax(self, params: SamplingParams, guide: Any = None) -> bool:
        """Whether this request's tokens come from the head's argmax (greedy
        with nothing that reshapes the logits: no penalty, no grammar)
        instead of its logits."""
        plain = (params.temperature == 0 and params.repetition_penalty == 1.0 and not params.presence_penalty
                 and not params.frequency_penalty and guide is None)
        if self.layout.argmax_only and not plain:
            raise BadInput(f"{self.name} was converted with ANEMLL's --argmax: its LM head returns only the most "
                           "likely token, so it decodes greedily only, without penalties or a format",
                           "send temperature 0, no repetition/presence/frequency penalty and no format or tools, "
                           "or re-convert the model without --argmax (anemlld convert keeps the logits and adds "
                           "the argmax with --argmax-in-model)", code="bad_request")
        return plain and self.executor.has_argmax

    def generate(self, prompt: str | None = None, messages: list[dict] | None = None,
                 params: SamplingParams | None = None, session: Session | None = None,
                 cancel: threading.Event | None = None, *, ids: list[int] | None = None,
                 guide: Any = None) -> Iterator[Token | Done]:
        """Stream ``Token`` events, then one ``Done`` with the statistics.
        ``ids`` is the prompt already encoded (instead of prompt/messages).
        ``guide`` (anemlld.runtime.grammar.Guide) masks the logits before each
        token is sampled, hears each token, and ends the answer when complete.
        Afterwards ``session`` holds the prompt and the answer, but for the
        last token sampled, which was never run."""
        params = params or SamplingParams()
        session = session or self.new_session()
        stats = Stats()
        ids = list(ids) if ids is not None else self.encode(prompt, messages)
        stats.prompt_tokens = len(ids)
        ids, stats.truncated_tokens = self._fit(ids, params)
        if stats.truncated_tokens:
            session.tokens.clear()
        stats.cached_tokens = self._reuse(session, ids)
        greedy = self._head_argmax(params, guide)
        calls = self.executor.predictions
        t0 = time.perf_counter()
        todo = ids[stats.cached_tokens:]
        logits = self.feed(session, todo, cancel, greedy)
        stats.prefill_tokens = len(todo)
        stats.prefill_ms = (time.perf_counter() - t0) * 1000

        sampler, detok, generated = Sampler(params), Detokenizer(self.tokenizer, params.stop), []
        prefill_calls, decoded = self.executor.predictions, 0
        t1 = time.perf_counter()
        reason = "cancelled" if logits is None else ""
        while not reason:
            if guide is not None:
                logits = guide.mask(logits)
            token = logits if greedy else sampler(logits, session.tokens, generated)
            if token in self.eos:
                reason = "stop"
                break
            generated.append(token)
            if guide is not None:
                guide.accept(token)
            text = detok.add(token)
            if text or not detok.stopped:
                yield Token(text, [token])
            if detok.stopped or (guide is not None and guide.finished):
                reason = "stop"
            elif len(generated) >= params.max_tokens:
                reason = "length"
            elif cancel is not None and cancel.is_set():
                reason = "cancelled"
            else:
                if len(session.tokens) >= self.ctx:
                    stats.context_shifts += 1
                    recent = self._shift(session) + [token]
                    decoded += len(recent)
                    logits = self.feed(session, recent, cancel, greedy)
                else:
                    decoded += 1
                    logits = self.feed(session, [token], greedy=greedy)
                if logits is None:
                    reason = "cancelled"
        tail = detok.flush()
        if tail:
            yield Token(tail, [])
        stats.decode_ms = (time.perf_counter() - t1) * 1000
        stats.completion_tokens = len(generated)
        stats.tokens_per_s = len(generated) / (stats.decode_ms / 1000) if stats.decode_ms > 0 else 0.0
        stats.done_reason = reason
        stats.predictions = self.executor.predictions - calls
        stats.predictions_per_token = (self.executor.predictions - prefill_calls) / decoded if decoded else 0.0
        yield Done(detok.answer, generated, stats)

    def complete(self, *args, **kw) -> Done:
        """Run :meth:`generate` to the end; the final ``Done``."""
        done = None
        for event in self.generate(*args, **kw):
            done = event
        assert isinstance(done, Done)
        return done
