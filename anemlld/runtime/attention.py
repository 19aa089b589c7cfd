"""What the chunks' attention layers are told at each step, besides the hidden
states: the positions, the causal mask of the full-attention layers, where
the step writes its K/V, and for sliding-window layers their own mask.

Inputs of a chunk function over ``S`` tokens starting at position ``p``
(``ctx`` = context length, the README's layout table lists them too):

- ``position_ids`` (S,): ``p .. p+S-1``, for the rotary tables;
- ``causal_mask`` (1, 1, S, ctx): 0 where a row may attend, -inf elsewhere;
  full layers see every key up to their own position;
- ``current_pos`` (1,): ``p``, where the full layers write;
- ``local_mask`` (1, 1, S, ctx), only in models with sliding-window layers:
  the causal mask banded to the last ``sliding_window`` keys.
"""
from __future__ import annotations

import numpy as np

from anemlld.layout import Layout


class Steps:
    """The inputs of every step of one converted model."""

    def __init__(self, layout: Layout):
        self.ctx = layout.context_length
        self.window = layout.sliding_window
        rows = np.arange(self.ctx)
        causal = rows[None, :] <= rows[:, None]
        self.causal = np.where(causal, 0.0, -np.inf).astype(np.float16)
        self.local = None
        if self.window is not None:
            self.local = np.where(causal & (rows[None, :] > rows[:, None] - self.window), 0.0, -np.inf
                                  ).astype(np.float16)

    def step(self, pos: int, count: int) -> dict[str, np.ndarray]:
        """The inputs for ``count`` tokens at positions ``pos`` onward."""
        out = {"position_ids": np.arange(pos, pos + count, dtype=np.int32),
               "causal_mask": self.causal[None, None, pos:pos + count],
               "current_pos": np.array([pos], dtype=np.int32)}
        if self.local is not None:
            out["local_mask"] = self.local[None, None, pos:pos + count]
        return out
