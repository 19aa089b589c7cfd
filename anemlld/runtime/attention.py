"""What the chunks' attention layers are told at each step, besides the hidden
states: the positions, where the step writes its K/V, and which cached keys
each row may attend to; and, for sliding-window layers, what their ring
cache holds.

Inputs of a chunk function over ``S`` tokens starting at position ``p``
(``ctx`` = context length; the README's layout table lists them too):

- ``position_ids`` (S,): ``p .. p+S-1``, for the rotary tables;
- full-attention layers (if the model has any): ``causal_mask``
  (1, 1, S, ctx), 0 where a row may attend and -inf elsewhere, every key up to
  its own position; ``current_pos`` (1,): ``p``, where they write;
- sliding-window layers (if any): ``ring_pos`` (1,): ``p mod R``, the slot of
  their ring of ``R`` slots where the step's first token goes (the rest
  follow contiguously); ``local_mask`` (1, 1, S, R): slot ``s`` is open to
  the row at position ``q`` when it holds a position in ``(q - window, q]``.

The engine starts prefill batches at multiples of the batch size; with R a
multiple of it (``ring_size``), a batch's slots never wrap around the ring.
"""
from __future__ import annotations

import numpy as np

from anemlld.layout import Layout


class Ring:
    """Which position each slot of one state's ring holds (-1: none yet)."""

    def __init__(self, size: int, window: int):
        self.size, self.window = size, window
        self.slots = np.full(size, -1, dtype=np.int64)

    def write(self, pos: int, count: int) -> int:
        """Record positions ``pos .. pos+count-1`` as written; their first slot."""
        first = pos % self.size
        if first + count > self.size:
            raise ValueError(f"{count} tokens at position {pos} would wrap a ring of {self.size}: "
                             "prefill batches must start at multiples of the batch size")
        self.slots[first:first + count] = np.arange(pos, pos + count)
        return first

    def reach(self, n: int) -> int:
        """How many of the first ``n`` cached tokens a continuation can keep:
        the largest ``m <= n`` such that the ring still holds the keys the
        token at ``m`` needs, positions ``m - window + 1 .. m - 1`` (so 0
        always qualifies). Slots holding positions ``m`` and later are stale
        but harmless: each is overwritten before any row that could see it."""
        if n <= 0:
            return 0
        held = np.zeros(n, dtype=bool)
        valid = self.slots[(self.slots >= 0) & (self.slots < n)]
        held[valid] = True
        missing = np.concatenate([[0], np.cumsum(~held)])  # missing[k]: positions < k not held
        m = np.arange(n + 1)
        ok = missing[m] == missing[np.maximum(0, m - self.window + 1)]
        return int(np.flatnonzero(ok)[-1])

    def step_inputs(self, pos: int, count: int) -> dict[str, np.ndarray]:
        """``ring_pos`` and ``local_mask`` for ``count`` tokens at ``pos``, recorded as written."""
        return {"ring_pos": np.array([self.write(pos, count)], dtype=np.int32), "local_mask": self.mask(pos, count)}

    def mask(self, pos: int, count: int) -> np.ndarray:
        """``local_mask`` for rows at positions ``pos ..``, over the slots as they are now."""
        rows = np.arange(pos, pos + count)[:, None]
        held = self.slots[None, :]
        allowed = (held >= 0) & (held <= rows) & (held > rows - self.window)
        return np.where(allowed, 0.0, -np.inf).astype(np.float16)[None, None]


class Steps:
    """The inputs of every step of one converted model."""

    def __init__(self, context_length: int, window: int | None = None, ring: int | None = None,
                 full: bool = True):
        """``window`` and ``ring``: the sliding-window layers' window and ring
        size (None: no such layers); ``full``: whether there are full layers.
        A window without a ring is an older layout (anemlld before rings),
        where every layer had the window in its causal mask."""
        self.ctx, self.window, self.ring, self.full = context_length, window, ring, full
        rows = np.arange(context_length)
        allowed = rows[None, :] <= rows[:, None]
        if window is not None and ring is None:
            allowed &= rows[None, :] > rows[:, None] - window
        self.causal = np.where(allowed, 0.0, -np.inf).astype(np.float16)

    @classmethod
    def of(cls, layout: Layout) -> "Steps":
        # ANEMLL's shifted local caches take the plain causal mask (its first columns)
        window = None if layout.rotation_window else layout.sliding_window
        return cls(layout.context_length, window, layout.ring_size, layout.full_attention)

    def new_ring(self) -> Ring | None:
        return None if self.ring is None else Ring(self.ring, self.window)

    def step(self, pos: int, count: int, ring: Ring | None = None) -> dict[str, np.ndarray]:
        """The inputs for ``count`` tokens at positions ``pos`` onward; the
        tokens are recorded as written into ``ring`` (a ``Ring``, or
        ANEMLL's shifted cache: runtime/rotation.py)."""
        out = {"position_ids": np.arange(pos, pos + count, dtype=np.int32)}
        if self.full:
            out["causal_mask"] = self.causal[None, None, pos:pos + count]
            out["current_pos"] = np.array([pos], dtype=np.int32)
        if ring is not None:  # a Ring, or ANEMLL's shifted cache (runtime/rotation.py), which takes no inputs
            out.update(ring.step_inputs(pos, count))
        return out
