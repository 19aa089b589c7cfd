"""Sliding-window attention, per layer: models whose layers all have a window
(Mistral) and models that mix sliding-window and full layers (Qwen2 with
``layer_types``, as Gemma 3 does) match transformers in fp32 on sequences
several times longer than the window, through prefill batches and single
tokens, in torch and converted through the portable executor."""
from __future__ import annotations

import pytest
import torch

from anemlld.convert import pipeline
from anemlld.convert.models import ARCHITECTURES
from anemlld.convert.models.base import ring_size
from anemlld.convert.source import HFSource
from shared.options import ConvertOptions
from tests.ane_reference import chained, run
from tests.conftest import make_tiny_model

WINDOW = 4
MIXED = dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0,
             layer_types=["sliding_attention", "full_attention", "sliding_attention"])
MODELS = {"mistral": ("mistral", dict(sliding_window=WINDOW)), "mixed": ("qwen2", MIXED),
          "mixed-qwen3": ("qwen3", MIXED)}
IDS = [0, 17, 300, 52, 99, 1000, 7, 2048, 11, 5, 900, 33, 61, 402, 18, 7, 77, 2500, 3, 1200, 45, 8, 640, 91,
       3000, 12, 70, 256, 9, 1800, 64, 2, 430, 3900, 21, 808, 14, 1500, 66, 2222, 31, 707, 10, 3333, 48, 96,
       1024, 13]  # 48 tokens: 12 windows, 3 turns of a 16-slot ring
CTX, BATCH = 64, 8
RING = 16  # ring_size(4, 8, 64): the window and one batch, rounded up to whole batches


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, tuple[str, object]]:
    root = tmp_path_factory.mktemp("sw")
    return {name: (arch, make_tiny_model(arch, root / name, seed=5, **cfg)) for name, (arch, cfg) in MODELS.items()}


def transformers_logits(folder, ids: list[int], windows: bool = True) -> torch.Tensor:
    """transformers' fp32 logits after each token of ``ids`` (one causal
    pass); ``windows=False``: the same weights with every layer full."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(folder)
    if not windows:
        cfg.sliding_window, cfg.layer_types = None, ["full_attention"] * cfg.num_hidden_layers
    ref = AutoModelForCausalLM.from_pretrained(folder, config=cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0]


@pytest.fixture(scope="module")
def reference_logits(sources) -> dict[str, torch.Tensor]:
    return {name: transformers_logits(folder, IDS) for name, (_, folder) in sources.items()}


def test_the_ring_holds_the_window_and_a_batch_in_whole_batches():
    assert ring_size(WINDOW, BATCH, CTX) == RING
    assert ring_size(512, 64, 4096) == 576 and ring_size(500, 64, 4096) == 576
    assert ring_size(8, 16, 64) == 32 and ring_size(60, 16, 64) == 64  # never more than the context


def test_layer_windows_follow_layer_types_and_the_window(sources):
    windows = {name: ARCHITECTURES[arch].model_args(HFSource.open(folder).config).layer_windows
               for name, (arch, folder) in sources.items()}
    assert windows == {"mistral": (WINDOW, WINDOW), "mixed": (WINDOW, None, WINDOW),
                       "mixed-qwen3": (WINDOW, None, WINDOW)}
    # a window as long as the context never takes effect
    args = ARCHITECTURES["qwen2"].model_args(HFSource.open(sources["mixed"][1]).config)
    assert args.within(WINDOW).layer_windows == (None, None, None)


@pytest.mark.parametrize("name", sorted(MODELS))
@torch.no_grad()
def test_torch_model_matches_transformers_at_every_position_through_prefill_and_single_tokens(
        name, sources, reference_logits):
    arch, folder = sources[name]
    ends, parts, _ = chained(arch, HFSource.open(folder), chunks=2, ring=RING)
    want = reference_logits[name]
    got = [run(ends, parts, IDS[:9], 0)]  # one batch of 9, then one token at a time
    got += [run(ends, parts, [t], i) for i, t in enumerate(IDS[9:], start=9)]
    worst = max((g - want[i]).abs().max().item() for i, g in zip(range(8, len(IDS)), got))
    assert worst < 1e-4, worst
    # the windows matter here: the same weights with every layer full answer otherwise
    assert (transformers_logits(folder, IDS, windows=False)[-1] - want[-1]).abs().max().item() > 0.01


@pytest.fixture(scope="module")
def engine(sources, tmp_path_factory):
    """The mixed model converted without LUT, run by the portable executor (a
    converted Mistral, every layer in a ring, is test_architectures')."""
    from anemlld.runtime.engine import Engine

    dest = tmp_path_factory.mktemp("ane") / "mixed"
    pipeline.convert(sources["mixed"][1], dest, ConvertOptions.from_mapping({
        "context_length": CTX, "batch_size": BATCH, "chunks": 2, "lut_embeddings": "none", "lut_ffn": "none",
        "lut_lm_head": "none"}))
    return Engine(dest, executor="portable")


def test_converted_model_matches_transformers_at_every_position(engine, reference_logits):
    want = reference_logits["mixed"].double().numpy()
    assert engine.layout.sliding_window == WINDOW
    session = engine.new_session()
    got = {19: engine.feed(session, IDS[:20])}  # two batches of 8 through prefill, 4 through infer
    for i in range(20, len(IDS)):
        got[i] = engine.feed(session, [IDS[i]])
    worst = max(abs(logits.astype("float64") - want[i]).max() for i, logits in got.items())
    assert worst < 0.05, worst  # fp16 parts


def test_packages_declare_the_ring_and_the_full_cache_as_two_states(engine):
    """What coremltools' own spec reader sees in the mixed model's chunks: the
    full layer's cache over the context, the two local layers' ring of 16
    slots, and the inputs that address each (the second chunk holds only a
    local layer and declares the same)."""
    import coremltools as ct

    layout = engine.layout
    assert (layout.sliding_window, layout.ring_size) == (WINDOW, RING)
    assert (layout.params["local_layers"], layout.params["global_layers"]) == ([0, 2], [1])
    kv_heads, head_dim = 2, 16
    for chunk in layout.chunks():
        desc = ct.utils.load_spec(str(chunk)).description
        for fn in desc.functions:
            seq = 1 if fn.name == "infer" else BATCH
            inputs = {x.name: tuple(x.type.multiArrayType.shape) for x in fn.input}
            assert inputs == {"hidden_states": (1, seq, 64), "position_ids": (seq,), "causal_mask": (1, 1, seq, CTX),
                              "current_pos": (1,), "local_mask": (1, 1, seq, RING), "ring_pos": (1,)}
            states = {x.name: tuple(x.type.stateType.arrayType.shape) for x in fn.state}
            assert states == {"model_model_kv_cache_global": (2 * 1, kv_heads, CTX, head_dim),
                              "model_model_kv_cache_local": (2 * 2, kv_heads, RING, head_dim)}
    slots = 1 * CTX + 2 * RING
    assert engine.state_bytes == 2 * kv_heads * slots * head_dim * 2


def test_continuing_a_cached_prefix_of_every_alignment_matches_transformers(engine, reference_logits):
    """A state holding 8 + k tokens (k = 0..7) continues with 17 more: the
    tokens before the next multiple of the batch go through infer, then a
    batch, then single tokens, around the ring several times."""
    want = reference_logits["mixed"].double().numpy()
    worst = 0.0
    for k in range(BATCH):
        session = engine.new_session()
        n = BATCH + k
        engine.feed(session, IDS[:n])
        checks = {n + 16: engine.feed(session, IDS[n:n + 17])}
        for i in range(n + 17, min(n + 22, len(IDS))):
            checks[i] = engine.feed(session, [IDS[i]])
        worst = max(worst, *(abs(logits.astype("float64") - want[i]).max() for i, logits in checks.items()))
    assert worst < 0.05, worst


def test_a_ring_state_is_reused_only_as_far_back_as_it_holds_the_window(engine, sources):
    """A state holding 40 tokens keeps positions 24..39 in its 16-slot ring:
    a prompt sharing its first m tokens reuses them when the m-th token's
    window (positions m-3..m-1) is still there, m >= 27, else nothing; either
    way the answer is transformers' on the new prompt."""
    from anemlld.runtime.prefix_cache import reusable

    folder = sources["mixed"][1]
    other = [3000 + i for i in range(8)]
    for shared, reused in ((38, 38), (30, 30), (27, 27), (26, 0), (10, 0)):
        session = engine.new_session()
        engine.feed(session, IDS[:40])
        prompt = IDS[:shared] + other
        assert reusable(session.tokens, prompt, session.ring) == reused
        n = engine._reuse(session, prompt)
        assert n == reused
        want = transformers_logits(folder, prompt).double().numpy()
        got = {len(prompt) - 8: engine.feed(session, prompt[n:len(prompt) - 7])}
        for i in range(len(prompt) - 7, len(prompt)):
            got[i] = engine.feed(session, [prompt[i]])
        worst = max(abs(logits.astype("float64") - want[i]).max() for i, logits in got.items())
        assert worst < 0.03, shared  # 0.01 measured; reusing past the ring: 1.6 at m = 26


def test_a_context_shift_leaves_a_ring_state_that_matches_transformers(engine, sources):
    """Decoding past the context re-prefills the recent half into the same
    state; its rings then hold what transformers computes for those tokens."""
    from anemlld.runtime.sampling import SamplingParams

    session = engine.new_session()
    done = engine.complete(ids=IDS[:40], params=SamplingParams(max_tokens=40), session=session)
    assert done.stats.context_shifts >= 1
    held = list(session.tokens)
    logits = engine.feed(session, [done.token_ids[-1]])
    want = transformers_logits(sources["mixed"][1], held + [done.token_ids[-1]])[-1].double().numpy()
    assert abs(logits.astype("float64") - want).max() < 0.05


def test_a_folder_from_before_rings_gets_the_window_in_its_causal_mask():
    """meta.yaml with a sliding_window and no ring_size (anemlld's Mistral
    before rings): every layer took the band in causal_mask, and still does."""
    import numpy as np

    from anemlld.runtime.attention import Steps

    steps = Steps(CTX, WINDOW, ring=None)
    assert steps.new_ring() is None
    step = steps.step(10, 2)
    assert set(step) == {"position_ids", "causal_mask", "current_pos"}
    open_keys = [np.flatnonzero(row == 0).tolist() for row in step["causal_mask"][0, 0]]
    assert open_keys == [[7, 8, 9, 10], [8, 9, 10, 11]]


def test_a_batch_that_would_wrap_the_ring_is_refused():
    from anemlld.runtime.attention import Ring

    ring = Ring(RING, WINDOW)
    ring.write(0, BATCH)
    with pytest.raises(ValueError, match="multiples of the batch size"):
        ring.write(12, BATCH)


@pytest.mark.parametrize("change, message", [
    (dict(ring_size=12), "ring_size 12 cannot hold a window of 4 and a batch of 8"),
    (dict(ring_size=None), None),  # anemlld's folders from before rings: served
    (dict(ring_size=None, anemll=True), None),  # ANEMLL's Gemma 3 layout: served with rotate functions
    (dict(sliding_window=None), "a ring_size but no sliding_window"),
])
def test_meta_yaml_with_an_unservable_window_or_ring_is_refused_by_name(engine, tmp_path, change, message):
    import shutil

    import yaml

    from anemlld.layout import MANIFEST_FILE, read_meta
    from shared.errors import BadInput

    folder = tmp_path / "m"
    shutil.copytree(engine.layout.root, folder)
    doc = yaml.safe_load((folder / "meta.yaml").read_text())
    anemll = change.pop("anemll", False)
    if anemll:
        (folder / MANIFEST_FILE).unlink()
    doc["model_info"]["parameters"].update(change)
    (folder / "meta.yaml").write_text(yaml.safe_dump(doc))
    if message is None:
        assert read_meta(folder).ring_size is None and read_meta(folder).sliding_window == WINDOW
        assert read_meta(folder).rotation_window == (WINDOW if anemll else None)  # tests/test_anemll_gemma.py
        return
    with pytest.raises(BadInput, match=message) as info:
        read_meta(folder)
    assert info.value.hint
