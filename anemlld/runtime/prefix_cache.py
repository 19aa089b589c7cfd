"""The prefix cache: the KV states a resident model keeps between requests, so
that any request, with or without a session id, prefills only the part of its
prompt that no kept state already holds.

The rule, read aloud:

    A request takes the state whose tokens share the longest prefix with its
    prompt; on a tie, the one labelled with the request's session id, then the
    most recently used. If none shares a token, it gets a fresh state, or, when
    the pool is full, the least recently used one, overwritten. The state is
    out of the pool while the request runs and goes back afterwards as the most
    recently used, labelled with the request's session id. The pool keeps at
    most ``max_states`` states and ``max_bytes`` bytes; the least recently used
    go first.

A session id is therefore only a label that wins ties: a session is a cache,
not a history (docs/protocol.md). Reuse cannot change an answer because the
engine keeps only the K/V of tokens identical to the prompt's, position for
position, and runs the rest. A model with sliding-window layers keeps their
K/V in a ring that overwrites old positions, so a state's prefix is reusable
only as far back as its ring still holds the window of keys the first new
token needs (``Ring.reach`` in runtime/attention.py).

No numpy or torch here: the residency imports this before any model loads.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)


@dataclass(eq=False)  # identity, not contents: two states holding the same tokens are two states
class Session:
    """A KV-cache state and the tokens whose K/V it holds (positions 0..n-1);
    ``ring``, for models with sliding-window layers, records which positions
    their ring cache still holds."""

    state: Any
    tokens: list[int] = field(default_factory=list)
    ring: Any = None


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def reusable(tokens: Sequence[int], ids: Sequence[int], ring: Any = None) -> int:
    """How many of ``ids`` a state holding ``tokens`` saves: the shared prefix,
    less the prompt's last token, which always runs again for its logits; with
    a ``ring``, no more than it can continue from (``ring.reach``)."""
    n = min(common_prefix(tokens, ids), len(ids) - 1)
    return n if ring is None or n <= 0 else ring.reach(n)


def state_nbytes(state: Any) -> int | None:
    """The size of a state made of arrays (one, or a dict/list of them); None
    for an opaque one (a Core ML state)."""
    parts = list(state.values()) if isinstance(state, dict) else list(state) if isinstance(state, (list, tuple)) \
        else [state]
    sizes = [getattr(p, "nbytes", None) for p in parts]
    if not sizes or not all(isinstance(s, int) for s in sizes):
        return None
    return sum(sizes)


class PrefixCache:
    """One resident model's pool of KV states (least recently used first)."""

    def __init__(self, new_state: Callable[[], Session], max_states: int, max_bytes: int,
                 state_bytes: int | None = None):
        """``state_bytes`` is the size of one state if the engine knows it;
        otherwise it is measured on the first state put back, and if that
        cannot be measured either, only ``max_states`` bounds the pool."""
        self._new_state = new_state
        self.max_states = max(0, int(max_states))
        self.max_bytes = max(0, int(max_bytes))
        self.state_bytes = state_bytes
        self._measured = state_bytes is not None
        self._pool: list[tuple[Session, str | None]] = []

    @property
    def capacity(self) -> int:
        """How many states the bounds allow."""
        if self.state_bytes:
            return min(self.max_states, self.max_bytes // self.state_bytes)
        return self.max_states

    def __len__(self) -> int:
        return len(self._pool)

    @property
    def bytes(self) -> int | None:
        """What the states held take, if their size is known."""
        return len(self._pool) * self.state_bytes if self.state_bytes else None

    def take(self, ids: Sequence[int], label: str | None = None) -> Session:
        """The state to run a prompt of ``ids`` on, out of the pool until ``put``."""
        best, best_key = None, (0, False, -1)
        for age, (session, tag) in enumerate(self._pool):
            key = (reusable(session.tokens, ids, session.ring), label is not None and tag == label, age)
            if key[0] > 0 and key > best_key:
                best, best_key = session, key
        if best is not None:
            self._pool = [(s, t) for s, t in self._pool if s is not best]
            return best
        if self._pool and len(self._pool) >= self.capacity:
            # full: overwrite the stalest state rather than allocate one more
            session, _ = self._pool.pop(0)
            session.tokens.clear()
            return session
        return self._new_state()

    def put(self, session: Session, label: str | None = None) -> None:
        """``session`` back, as the most recently used, labelled ``label``."""
        if not self._measured:
            self._measured = True
            self.state_bytes = state_nbytes(session.state)
        self._pool.append((session, label))
        while len(self._pool) > self.capacity:
            self._pool.pop(0)

    def clear(self) -> None:
        self._pool.clear()
