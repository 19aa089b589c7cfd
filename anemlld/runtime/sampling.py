"""Choosing the next token from logits: greedy, temperature, top-k, top-p,
repetition penalty (over the whole context), presence and frequency penalties
(OpenAI's, over the tokens generated so far in this answer), seeded. Works on
one float32 logits vector."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from shared.errors import BadInput


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 is greedy
    top_k: int = 0            # 0 is off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0   # subtracted once from every token already in the answer
    frequency_penalty: float = 0.0  # subtracted per time a token is already in the answer
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        checks = [
            (self.max_tokens >= 1, "max_tokens must be at least 1"),
            (self.temperature >= 0, "temperature must be 0 (greedy) or more"),
            (self.top_k >= 0, "top_k must be 0 (off) or more"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be above 0 (1 is off)"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise BadInput(msg, "fix the sampling option and send the request again", code="bad_request")


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, context: Sequence[int], generated: Sequence[int] = ()) -> int:
        """The next token. ``context`` is every token before it (prompt and
        answer), ``generated`` the answer's tokens so far."""
        p = self.params
        logits = self.penalized(logits, context, generated)
        if p.temperature == 0:
            return int(np.argmax(logits))
        return self._draw(logits)

    def penalized(self, logits: np.ndarray, context: Sequence[int], generated: Sequence[int] = ()) -> np.ndarray:
        """The logits (as float64) after the penalties, before temperature."""
        p = self.params
        logits = logits.astype(np.float64, copy=True)
        if p.repetition_penalty != 1.0 and context:
            seen = np.unique(np.asarray(context, dtype=np.int64))
            seen = seen[seen < logits.shape[0]]
            vals = logits[seen]
            logits[seen] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and len(generated):
            ids, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
            inside = ids < logits.shape[0]
            logits[ids[inside]] -= p.frequency_penalty * counts[inside] + p.presence_penalty
        return logits

    def _draw(self, logits: np.ndarray) -> int:
        """A token at temperature, within top-k and top-p (``logits`` is ours to change)."""
        p = self.params
        logits /= p.temperature
        if p.top_k and p.top_k < logits.shape[0]:
            kth = np.partition(logits, -p.top_k)[-p.top_k]
            logits[logits < kth] = -np.inf
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            # keep the smallest set whose mass reaches top_p (always the top token)
            cut = int(np.searchsorted(cumulative, p.top_p)) + 1
            keep = np.zeros_like(probs, dtype=bool)
            keep[order[:cut]] = True
            probs = np.where(keep, probs, 0.0)
            probs /= probs.sum()
        return int(self.rng.choice(probs.shape[0], p=probs))
