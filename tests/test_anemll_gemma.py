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
from tests.anemll_folders import agree_until_a_near_tie, anemll_gemma_chunks, anemll_gemma_folders, edit_meta, hf_greedy
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
def folders(gemma, tmp_path_factory):
    """ANEMLL's layout of it (tests/anemll_folders.py): four functions in one
    file per chunk, split-rotate (two files per chunk), and prefill taking
    update_mask."""
    src, ours = gemma
    return anemll_gemma_folders(ours, src, tmp_path_factory.mktemp("anemll"))


@pytest.fixture(scope="module")
def anemll(folders):
    return folders[0]


@pytest.fixture(scope="module")
def split(folders):
    return folders[1]


@pytest.fixture(scope="module")
def masked(folders):
    return folders[2]


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


def test_the_synthetic_folder_is_laid_out_as_anemll_writes_it(anemll, split):
    import coremltools as ct

    lay = layout.read_meta(anemll)
    assert lay.rotation_window == WINDOW and not lay.split_rotate
    spec = ct.utils.load_spec(str(lay.chunks(".mlpackage")[0]))
    functions = {f.name: f for f in spec.description.functions}
    assert sorted(functions) == sorted(["infer", "infer_rotate", "prefill", "prefill_rotate"])
    assert [i.name for i in functions["infer_rotate"].input] == ["hidden_states", "position_ids", "causal_mask",
                                                                  "current_pos"]
    states = {s.name: tuple(s.type.stateType.arrayType.shape) for s in functions["prefill"].state}
    # 2 local layers of window slots, 1 global layer of context slots; kv_heads 2, head_dim 32
    # (coremltools writes ANEMLL's model.model.kv_cache_local as model_model_kv_cache_local, for both)
    assert states == {"model_model_kv_cache_local": (4, 2, WINDOW, 32),
                      "model_model_kv_cache_global": (2, 2, CONTEXT, 32)}
    lay = layout.read_meta(split)
    assert lay.split_rotate and [p.name for p in lay.prefill_chunks(".mlpackage")] == [
        "gemma3_PF_chunk_01of02.mlpackage", "gemma3_PF_chunk_02of02.mlpackage"]
    assert [p.name for p in lay.chunks(".mlpackage")][1] == "gemma3_FFN_chunk_02of02_combined.mlpackage"


def test_the_served_folder_has_transformers_logits_across_the_window(gemma, anemll):
    """Prompt of 20 (a prefill batch, 4 fill tokens, 8 past the window), then
    16 single tokens: each step's logits within 0.05 of transformers'."""
    from transformers import AutoModelForCausalLM

    from tests.test_architectures import assert_matches

    ref = AutoModelForCausalLM.from_pretrained(gemma[0], dtype=torch.float32).eval()
    engine = Engine(anemll, executor="portable")
    assert engine.rotation is not None and engine.rotation.window == WINDOW
    assert_matches(engine, ref, PROMPT, 16)


def test_switching_to_infer_rotate_one_position_early_is_caught(gemma, anemll, monkeypatch):
    """(One position late, infer writes past the local cache's last slot: the
    portable executor refuses the slice.)"""
    from transformers import AutoModelForCausalLM

    from tests.test_architectures import assert_matches

    ref = AutoModelForCausalLM.from_pretrained(gemma[0], dtype=torch.float32).eval()
    monkeypatch.setattr(rotation.Rotation, "infer_function",
                        lambda self, pos: rotation.INFER_ROTATE if pos >= self.window - 1 else rotation.INFER)
    with pytest.raises(AssertionError):
        assert_matches(Engine(anemll, executor="portable"), ref, PROMPT, 16)


def calls(engine: Engine) -> list[tuple[str, int, int]]:
    """Record each FFN call of ``engine``: (function, first position, tokens)."""
    seen, ffn = [], engine.executor.ffn

    def record(hidden, step, state, function):
        seen.append((function, int(step["position_ids"][0]), len(step["position_ids"])))
        return ffn(hidden, step, state, function)

    engine.executor.ffn = record
    return seen


@pytest.mark.parametrize("prefill_keys, batches", [
    ({}, [("prefill", 0, BATCH)]),
    ({"prefill_dynamic_slice": False}, []),  # ANEMLL's prefill then writes at slot 0: its runner goes token by token
])
def test_the_engine_runs_each_position_through_anemlls_function_for_it(anemll, tmp_path, prefill_keys, batches):
    import shutil

    folder = tmp_path / "f"
    shutil.copytree(anemll, folder)
    edit_meta(folder, **prefill_keys)
    engine = Engine(folder, executor="portable")
    seen = calls(engine)
    engine.feed(engine.new_session(), PROMPT)
    first = batches[0][2] if batches else 0
    assert seen == batches + [("infer", p, 1) for p in range(first, WINDOW)] + [
        ("infer_rotate", p, 1) for p in range(WINDOW, len(PROMPT))]


def greedy(folder, ids: list[int], steps: int = STEPS, session=None):
    engine = Engine(folder, executor="portable")
    return engine.complete(ids=ids, params=SamplingParams(max_tokens=steps, temperature=0.0), session=session)


def until_eos(tokens: list[int]) -> list[int]:
    """transformers' greedy tokens as far as the engine goes (it stops at EOS: 1, 4 in the tiny config)."""
    ends = [i for i, t in enumerate(tokens) if t in (1, 4)]
    return tokens[:ends[0]] if ends else tokens


@pytest.mark.parametrize("variant", ["four functions", "split rotate", "update_mask prefill"])
def test_greedy_tokens_are_transformers_after_a_prompt_longer_than_the_window(folders, reference, variant):
    """(The update_mask prefill adds any wrong entry of its mask to the hidden
    states whose K/V it writes.)"""
    tokens, gaps = reference
    folder = folders[["four functions", "split rotate", "update_mask prefill"].index(variant)]
    if variant == "update_mask prefill":
        engine = Engine(folder, executor="portable")
        seen = calls(engine)
        engine.feed(engine.new_session(), PROMPT)
        assert seen[0] == ("prefill", 0, BATCH)
    done = greedy(folder, PROMPT)
    want = until_eos(tokens)
    assert len(want) >= 16
    assert agree_until_a_near_tie(done.token_ids, want, gaps) >= 16


def test_a_follow_up_reuses_a_rotated_state_only_whole(anemll):
    """Past the window the local cache cannot be moved back: a follow-up that
    extends the state's tokens reuses all of them (and answers as a fresh
    state does); one that parts from them earlier reuses none."""
    engine = Engine(anemll, executor="portable")
    session = engine.new_session()
    first = engine.complete(ids=PROMPT, params=SamplingParams(max_tokens=4, temperature=0.0), session=session)
    held = list(session.tokens)
    assert len(held) == len(PROMPT) + len(first.token_ids) - 1 > WINDOW
    follow = held + [first.token_ids[-1], 40, 41]
    again = engine.complete(ids=follow, params=SamplingParams(max_tokens=6, temperature=0.0), session=session)
    assert again.stats.cached_tokens == len(held)
    fresh = engine.complete(ids=follow, params=SamplingParams(max_tokens=6, temperature=0.0))
    assert again.token_ids == fresh.token_ids
    assert session.ring.reach(len(PROMPT)) == 0 and session.ring.reach(len(session.tokens)) == len(session.tokens)
    other = PROMPT + [50, 51, 52]  # shares the 20 prompt tokens with the state, then parts
    parted = engine.complete(ids=other, params=SamplingParams(max_tokens=6, temperature=0.0), session=session)
    assert parted.stats.cached_tokens == 0
    assert parted.token_ids == engine.complete(ids=other, params=SamplingParams(max_tokens=6, temperature=0.0)).token_ids
    short = engine.new_session()
    engine.feed(short, PROMPT[:10])
    assert short.ring.reach(6) == 6  # below the window any prefix still holds


def test_a_context_shift_past_the_window_answers_as_our_own_conversion(gemma, anemll):
    """Decoding past the context (48) keeps the recent half and prefills it
    again from position 0 (fill functions, then infer_rotate): the answer is
    the one our own conversion (ring caches) gives with the same rule."""
    _, ours = gemma
    theirs = greedy(anemll, PROMPT, steps=40)
    assert theirs.stats.context_shifts == 1 and len(theirs.token_ids) == 40
    assert theirs.token_ids == greedy(ours, PROMPT, steps=40).token_ids


@pytest.mark.parametrize("changes, refused", [
    ({"single_cache": True}, "single_cache"),
    ({"model_type": "monolithic", "monolithic_model": "gemma3_monolithic_full.mlmodelc"}, "monolithic Gemma 3"),
    ({"attention_size": 24}, "attention_size 24"),
    ({"split_rotate": True}, "names no pf"),
])
def test_anemll_gemma_variants_we_do_not_serve_are_refused_by_name(anemll, tmp_path, changes, refused):
    import shutil

    folder = tmp_path / "variant"
    shutil.copytree(anemll, folder)
    edit_meta(folder, **changes)
    with pytest.raises(BadInput, match=refused) as info:
        layout.read_meta(folder)
    assert info.value.hint


def test_a_split_rotate_folder_missing_a_prefill_file_is_incomplete(split, tmp_path):
    import shutil

    folder = tmp_path / "split"
    shutil.copytree(split, folder)
    shutil.rmtree(folder / "gemma3_PF_chunk_02of02.mlpackage")
    with pytest.raises(BadInput, match="names gemma3_PF_chunk_02of02, which is not in the folder"):
        layout.read_meta(folder).parts()


def test_a_window_as_long_as_the_context_needs_no_rotation(anemll, tmp_path):
    import shutil

    folder = tmp_path / "long-window"
    shutil.copytree(anemll, folder)
    edit_meta(folder, sliding_window=CONTEXT)
    assert layout.read_meta(folder).rotation_window is None


def test_the_daemon_serves_the_anemll_gemma_folder_with_transformers_tokens(gemma, anemll, tmp_path):
    """Dropped as a folder, loaded in a worker, one chat (its prompt longer
    than the window) answers with transformers' greedy tokens."""
    import shutil

    from shared import protocol
    from tests.daemon_harness import Client, DaemonProcess, wait_for_state

    chat = ({"role": "user", "content": "What does the tar command do with a gzip file?"},)
    ids = Engine(anemll, executor="portable").encode(messages=list(chat))
    assert len(ids) > WINDOW
    tokens, gaps = hf_greedy(gemma[0], ids, 16)
    daemon = DaemonProcess(tmp_path / "home").start()
    try:
        shutil.copytree(anemll, daemon.settings.drop_dir / "gemma3-anemll")
        with Client(daemon.settings, timeout=120) as c:
            wait_for_state(c, "gemma3-anemll", ("ready", "loaded"))
            events = c.stream(protocol.Generate, model="gemma3-anemll", messages=chat, max_tokens=16,
                              temperature=0.0)
            assert events[-1].event == "done", events[-1].data
            got = [t for e in events if e.event == "token" for t in e.data["token_ids"]]
    finally:
        assert daemon.stop() == 0, daemon.stderr()[-3000:]
    want = until_eos(tokens)
    assert len(got) == len(want) and agree_until_a_near_tie(got, want, gaps) >= min(len(want), 12)


def test_the_state_size_counts_window_slots_for_the_local_layers(anemll):
    from anemlld.runtime.engine import kv_state_bytes

    engine = Engine(anemll, executor="portable")
    measured = sum(t.numel() * t.element_size() for t in engine.new_session().state.values())
    assert kv_state_bytes(anemll, engine.layout) == measured == 2 * 2 * (2 * WINDOW + CONTEXT) * 32 * 2


def test_a_gemma3_folder_naming_no_window_gets_anemlls_default_of_512(anemll, tmp_path):
    import shutil

    folder = tmp_path / "no-window"
    shutil.copytree(anemll, folder)
    edit_meta(folder, sliding_window=None)
    assert layout.read_meta(folder).sliding_window == 512 and layout.read_meta(folder).rotation_window is None
    edit_meta(folder, context_length=1024, attention_size=1024)
    assert layout.read_meta(folder).rotation_window == 512
