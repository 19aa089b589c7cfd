"""fp16 range: how large the converted model's activations get, measured at
conversion, and the residual-stream scale that keeps them inside fp16.

Every activation of a converted part is fp16 (largest finite value 65,504).
Gemma 3's residual stream goes past that. The torch model runs in fp32 over
the verify sample (its first ``context_length`` tokens, ``MAX_TOKENS`` at
most), one chunk at a time as the export loads them, and every tensor an op
produces is measured. If the largest would come within ``HEADROOM`` of fp16's
maximum, the residual stream is carried scaled by a power of two (exact in
floating point) chosen from its own peak: architectures that can
(``RESIDUAL_SCALE``) fold the scale into the embeddings and into the norms
whose output joins the stream, and every norm that reads the stream cancels
it: RMSNorm(a x) = RMSNorm(x) but for eps, which acts as eps / a^2 (Gemma's
1e-6 as 1e-3 at a = 1/32, beside a mean square near 1 even at the embeddings).
The scaled model is measured again, so the number recorded is the one the
converted model will see.

The residual stream is told apart by shape: in the ANE layout it is the only
``(1, S, hidden)`` tensor that an addition produces (projections run
channels-first, norms concatenate ``[x, -x]``).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode

from anemlld.convert.export import FP16_MAX
from anemlld.convert.models.base import AneLM, ModelArgs, causal_mask
from shared.errors import AnemllError

log = logging.getLogger(__name__)

HEADROOM = 4.0  # another text may drive activations past the calibration text's: stay 4x below the maximum
TARGET = FP16_MAX / HEADROOM
MAX_TOKENS = 512


@dataclass
class Range:
    """What calibration measured (``peak``: at scale 1) and chose."""

    tokens: int
    peak: float
    peak_at: str  # the op and layer that produced it
    residual_peak: float
    residual_scale: float = 1.0
    scaled_peak: float = 0.0  # the converted model's largest activation, measured again with the scale

    def as_dict(self) -> dict:
        return {k: (float(f"{v:.5g}") if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()}

    def message(self, text: str) -> str:
        """The progress line; ``text``: what the calibration text was."""
        text = f"fp16 range over {self.tokens} tokens of {text}: largest activation {self.peak:.3g}"
        if self.residual_scale != 1.0:
            text += (f", residual stream {self.residual_peak:.3g}: scaled by 1/{1 / self.residual_scale:g}"
                     f" (largest now {self.scaled_peak:.3g})")
        return text


class _Peaks(TorchFunctionMode):
    """The largest finite magnitude of every floating tensor an op returns."""

    def __init__(self, hidden: int):
        super().__init__()
        self.hidden, self.where = hidden, ""
        self.peak, self.peak_at, self.residual = 0.0, "", 0.0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
                continue
            low, high = torch.aminmax(t.detach())
            value = max(-float(low), float(high))
            if not math.isfinite(value):  # the masks hold -inf
                value = float(torch.nan_to_num(t.detach(), posinf=0.0, neginf=0.0).abs().max())
            if value > self.peak:
                self.peak, self.peak_at = value, f"{getattr(func, '__name__', func)} in {self.where}"
            name = getattr(func, "__name__", "")
            residual = t.dim() == 3 and t.shape[0] == 1 and t.shape[2] == self.hidden
            if residual and name in ("add", "__add__", "__radd__"):
                self.residual = max(self.residual, value)
        return out


def calibration_ids(source_path: Path, vocab: int, limit: int) -> tuple[list[int], str]:
    """The verify sample as the source's tokenizer reads it; without a
    tokenizer, ids spread over the vocabulary (said in the second value)."""
    from anemlld.runtime.verify import SAMPLE_TEXT

    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(source_path), local_files_only=True)
        ids = list(tok(SAMPLE_TEXT.read_text(encoding="utf-8"))["input_ids"])[:limit]
        if len(ids) >= 2 and max(ids) < vocab:
            return ids, "the verify sample"
    except Exception as e:  # no tokenizer or an unreadable one: measure on spread ids instead
        log.info("calibrating without the tokenizer (%s)", e)
    step = max(1, vocab // limit)
    return [(i * step) % vocab for i in range(limit)], "ids spread over the vocabulary (no tokenizer)"


def measure(args: ModelArgs, chunks: list[range], load: Callable[..., AneLM],
            embed_rows: Callable[[list[int]], torch.Tensor], ids: list[int], context_length: int) -> _Peaks:
    """Run ``ids`` through every chunk (``load(layers=...)`` builds one with
    its weights) in fp32, measuring every tensor; ``embed_rows`` gives the
    embedded ids as the embeddings part computes them."""
    peaks = _Peaks(args.hidden_size)
    h = embed_rows(ids)[None]
    peaks.where = "the embeddings"
    value = float(h.abs().max())
    peaks.peak, peaks.peak_at, peaks.residual = value, "the embeddings", value
    positions = torch.arange(len(ids))
    mask = causal_mask(positions, context_length)
    local = causal_mask(positions, context_length, window=args.within(context_length).sliding_window)
    with torch.no_grad():
        for layers in chunks:
            lm = load(layers=layers, embeddings=False, lm_head=False)
            for i in layers:
                lm.model.layers[i].register_forward_pre_hook(lambda *_, i=i: setattr(peaks, "where", f"layer {i}"))
            with peaks:
                h = lm.layers_forward(h, positions, mask, torch.zeros(1, dtype=torch.int32), local)
            del lm
    return peaks


def fp16_range(args: ModelArgs, chunks: list[range], load: Callable[..., AneLM],
               embed_rows: Callable[[ModelArgs, list[int]], torch.Tensor], ids: list[int],
               context_length: int) -> Range:
    """Measure, and choose the residual scale (``load`` and ``embed_rows``
    take the arguments to build with, so the scaled model is measured too)."""
    first = measure(args, chunks, lambda **part: load(args, **part), lambda i: embed_rows(args, i), ids,
                    context_length)
    found = Range(len(ids), first.peak, first.peak_at, first.residual, scaled_peak=first.peak)
    if first.peak <= TARGET:
        return found
    if first.residual <= TARGET:
        return _beyond_reach(found, first)
    found.residual_scale = 2.0 ** -math.ceil(math.log2(first.residual / TARGET))
    scaled_args = dataclasses.replace(args, residual_scale=found.residual_scale)
    again = measure(scaled_args, chunks, lambda **part: load(scaled_args, **part),
                    lambda i: embed_rows(scaled_args, i), ids, context_length)
    found.scaled_peak = again.peak
    if again.peak > TARGET:
        return _beyond_reach(found, again)
    return found


def _beyond_reach(found: Range, peaks: _Peaks) -> Range:
    """A peak that scaling the residual stream does not lower: fine while
    inside fp16, an error past it."""
    if peaks.peak > FP16_MAX:
        raise AnemllError(f"an activation ({peaks.peak_at}) reaches {peaks.peak:.3g} on the calibration text, "
                          f"beyond fp16's {FP16_MAX:g}, and it is not on the residual stream, which the "
                          "converter can rescale", "report this with the model's config.json",
                          stage="calibrate", code="fp16_range")
    log.warning("fp16 range: %s reaches %.3g, within %gx of fp16's maximum", peaks.peak_at, peaks.peak, HEADROOM)
    return found
