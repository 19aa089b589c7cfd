"""Gemma 3 folders as ANEMLL 0.3.5 converts them (two states, four functions
per chunk, the local cache shifted once the position reaches the window;
docs/anemll.md): the synthetic folder is first checked against transformers
(fp32, run as ANEMLL's runner runs it), then served: the engine's greedy
tokens are transformers' across the window boundary, after a prompt longer
than the window, in both file layouts, through a context shift and a reused
prefix; switching functions one position late is caught; the variants we do
not serve are refused by name."""
from __future__ import annotations

import pytest
import torch

from anemlld import layout
from anemlld.convert import pipeline
from anemlld.convert.models.base import causal_mask
from anemlld.runtime import rotation
from anemlld.runtime.engine import Engine
from anemlld.runtime.sampling import SamplingParams
from shared.errors import BadInput
from shared.options import ConvertOptions
from tests.anemll_folders import agree_until_a_near_tie, anemll_gemma_chunks, anemll_gemma_folder, edit_meta, hf_greedy
from tests.conftest import make_tiny_model

WINDOW, CONTEXT, BATCH = 12, 48, 8
# 20 tokens: one prefill batch below the window, 4 fill tokens, 8 past the window
PROMPT = [2, 17, 300, 52, 99, 1000, 7, 2048, 11, 5, 900, 33, 61, 402, 18, 7, 77, 2500, 3, 1200]
STEPS = 20  # the last position run is 38: 27 past the window


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """The tiny Gemma 3 with a window of 12, and our conversion of it (context
    48, batch 8, 2 chunks, no LUT)."""
    root = tmp_path_factory.mktemp("gemma")
    src = make_tiny_model("gemma3", root / "src", sliding_window=WINDOW)
    ours = root / "ours"
    pipeline.convert(src, ours, ConvertOptions.from_mapping(
        {"context_length": CONTEXT, "batch_size": BATCH, "chunks": 2, "lut_embeddings": "none", "lut_ffn": "none",
         "lut_lm_head": "none"}))
    return src, ours


@pytest.fixture(scope="module")
def anemll(gemma, tmp_path_factory):
    src, ours = gemma
    return anemll_gemma_folder(ours, src, tmp_path_factory.mktemp("anemll") / "gemma3-anemll")


@pytest.fixture(scope="module")
def reference(gemma):
    src, _ = gemma
    return hf_greedy(src, PROMPT, STEPS)


@torch.no_grad()
def anemll_runner(chunks, ends, ids: list[int], prefill_rotate: bool = False) -> dict[int, torch.Tensor]:
    """``ids`` through the fixture's torch functions as ANEMLL's runner calls
    them: full prefill batches while below the window, every other token one
    at a time through infer, or infer_rotate from the window on (with
    ``prefill_rotate``, full batches past the window through it); the logits
    of each position run through infer, by position."""
    pos, logits = 0, {}

    def run(fn: str, start: int, count: int) -> torch.Tensor:
        h = ends.embed(torch.tensor([ids[start:start + count]]))
        positions = torch.arange(start, start + count, dtype=torch.int32)
        mask, at = causal_mask(positions, CONTEXT), torch.tensor([start], dtype=torch.int32)
        for chunk in chunks:
            h = chunk[fn](h, positions, mask, at)
        return h

    def infer(p: int) -> None:
        logits[p] = torch.cat(ends.head(run("infer_rotate" if p >= WINDOW else "infer", p, 1)), -1)[0, -1]

    while pos + BATCH <= len(ids) - 1 and pos + BATCH <= WINDOW:
        run("prefill", pos, BATCH)
        pos += BATCH
    if prefill_rotate:
        for pos in range(pos, WINDOW):
            infer(pos)
        pos = WINDOW
        while pos + BATCH <= len(ids) - 1:
            run("prefill_rotate", pos, BATCH)
            pos += BATCH
    for p in range(pos, len(ids)):
        infer(p)
    return logits


def test_the_synthetic_anemll_gemma_functions_match_transformers_in_fp32(gemma, reference):
    """The fixture is right before anything serves it: fed prompt and
    transformers' greedy answer (40 positions, 28 past the window), every
    position run through infer/infer_rotate has transformers' logits."""
    from transformers import AutoModelForCausalLM

    src, ours = gemma
    tokens, _ = reference
    ids = PROMPT + tokens
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    chunks, ends = anemll_gemma_chunks(src, ours)
    got = anemll_runner(chunks, ends, ids)
    assert min(got) == BATCH and max(got) == len(ids) - 1
    worst = max(float((got[p] - want[p]).abs().max()) for p in got)
    assert worst < 1e-3, worst
    # ANEMLL's prefill_rotate lets every row of a batch see all window slots
    # after the shift (later rows of its own batch included): not transformers'
    # attention, which is why the engine runs those positions through infer_rotate.
    chunks, ends = anemll_gemma_chunks(src, ours)
    rotated = anemll_runner(chunks, ends, ids, prefill_rotate=True)
    assert max(float((rotated[p] - want[p]).abs().max()) for p in rotated) > 0.1
