"""ANEMLL's Gemma 3 local cache, in folders ANEMLL converted (ours keep the
sliding-window layers' K/V in rings instead: runtime/attention.py).

Its local layers keep ``window`` slots. Below the window, ``infer`` and
``prefill`` write the token at position p into slot p (fill); from the
window on, ``infer_rotate`` shifts the slots left by one and writes at the
end, so they hold positions p - window + 1 .. p in order. Each function
takes the same inputs as any chunk (``position_ids``, the plain causal
mask's rows, ``current_pos``); the local layers read the mask's first
``window`` columns. The contract, with its sources, is in docs/anemll.md.

What the engine does with it: full prefill batches while they end at or
before the window (if the folder's prefill writes at ``current_pos``:
``prefill_dynamic_slice`` or ``update_mask_prefill``), every other token one at a time through ``infer`` or,
from the window on, ``infer_rotate``. ``prefill_rotate`` is never called:
it shifts by a whole batch and lets every row of it see every slot, its own
batch's later rows included, which is not the model's attention (measured
on the synthetic folder in tests/test_anemll_gemma.py: logits off by more
than 0.1 where infer_rotate matches transformers to 1e-3). The prompt's last
token also runs through infer, for its logits: ANEMLL's prefill returns no
row its runner reads.
"""
from __future__ import annotations

from anemlld.layout import Layout
from anemlld.runtime.executors import INFER, INFER_ROTATE


class Shifted:
    """What one state's shifted local cache holds: the ``written`` positions
    0..written-1, the last ``window`` of them."""

    def __init__(self, window: int):
        self.window, self.written = window, 0

    def step_inputs(self, pos: int, count: int) -> dict:
        """Record positions ``pos .. pos+count-1`` as written; no inputs of its own."""
        self.written = pos + count
        return {}

    def reach(self, n: int) -> int:
        """How many of the first ``n`` cached tokens a continuation can keep.
        Before any shift, slot s holds position s, so any prefix (the slots
        past it are masked until overwritten); after one, the slots hold the
        last window positions and cannot be moved back: only all of them."""
        return n if self.written <= self.window or n == self.written else 0


class Rotation:
    """Which function runs the tokens at a position, for one model."""

    def __init__(self, window: int, prefill: bool = True):
        """``prefill``: whether its prefill writes where ``current_pos`` says
        (a dynamic slice, or ``update_mask``); ANEMLL's without either writes
        every batch at slot 0, and its runner then feeds every token alone."""
        self.window, self.prefill = window, prefill

    @classmethod
    def of(cls, layout: Layout) -> "Rotation | None":
        if layout.rotation_window is None:
            return None
        return cls(layout.rotation_window, layout.prefill_dynamic_slice or layout.update_mask_prefill)

    def new_cache(self) -> Shifted:
        return Shifted(self.window)

    def infer_function(self, pos: int) -> str:
        return INFER_ROTATE if pos >= self.window else INFER

    def prefills(self, pos: int, count: int) -> bool:
        """Whether ``prefill`` may take ``count`` tokens at ``pos``: only fill
        batches, which end at or before the window."""
        return self.prefill and pos + count <= self.window
