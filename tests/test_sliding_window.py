"""Sliding-window attention, per layer: models whose layers all have a window
(Mistral) and models that mix sliding-window and full layers (Qwen2 with
``layer_types``, as Gemma 3 does) match transformers in fp32 on sequences
several times longer than the window, through prefill batches and single
tokens, in torch and converted through the portable executor."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from anemlld.convert import pipeline
from anemlld.convert.models import ARCHITECTURES
from anemlld.convert.source import HFSource
from shared.options import ConvertOptions
from tests.ane_reference import chained, run
from tests.conftest import make_tiny_model

WINDOW = 4
MIXED = dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0,
             layer_types=["sliding_attention", "full_attention", "sliding_attention"])
MODELS = {"mistral": ("mistral", dict(sliding_window=WINDOW)), "mixed": ("qwen2", MIXED)}
IDS = [0, 17, 300, 52, 99, 1000, 7, 2048, 11, 5, 900, 33, 61, 402, 18, 7, 77, 2500, 3, 1200, 45, 8, 640, 91,
       3000, 12, 70, 256, 9, 1800, 64, 2]  # 32 tokens: 8 windows


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, tuple[str, object]]:
    root = tmp_path_factory.mktemp("sw")
    return {name: (arch, make_tiny_model(arch, root / name, seed=5, **cfg)) for name, (arch, cfg) in MODELS.items()}


@pytest.fixture(scope="module")
def reference_logits(sources) -> dict[str, torch.Tensor]:
    """transformers' fp32 logits after each token of IDS (one causal pass)."""
    from transformers import AutoModelForCausalLM

    out = {}
    for name, (_, folder) in sources.items():
        ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            out[name] = ref(torch.tensor([IDS])).logits[0]
    return out


def test_layer_windows_follow_layer_types_and_the_window(sources):
    windows = {name: ARCHITECTURES[arch].model_args(HFSource.open(folder).config).layer_windows
               for name, (arch, folder) in sources.items()}
    assert windows == {"mistral": (WINDOW, WINDOW), "mixed": (WINDOW, None, WINDOW)}
    # a window as long as the context never takes effect
    args = ARCHITECTURES["qwen2"].model_args(HFSource.open(sources["mixed"][1]).config)
    assert args.within(WINDOW).layer_windows == (None, None, None)


@pytest.mark.parametrize("name", sorted(MODELS))
@torch.no_grad()
def test_torch_model_matches_transformers_at_every_position_through_prefill_and_single_tokens(
        name, sources, reference_logits):
    arch, folder = sources[name]
    ends, parts, _ = chained(arch, HFSource.open(folder), chunks=2)
    want = reference_logits[name]
    got = [run(ends, parts, IDS[:9], 0)]  # one batch of 9, then one token at a time
    got += [run(ends, parts, [t], i) for i, t in enumerate(IDS[9:], start=9)]
    worst = max((g - want[i]).abs().max().item() for i, g in zip(range(8, len(IDS)), got))
    assert worst < 1e-4, worst
    # the windows matter here: the same weights with every layer full answer otherwise
    for m in parts:
        m.args = dataclasses.replace(m.args, layer_windows=())
        m.reset_cache()
    assert (run(ends, parts, IDS, 0) - want[-1]).abs().max().item() > 0.01


@pytest.fixture(scope="module")
def engines(sources, tmp_path_factory):
    from anemlld.runtime.engine import Engine

    out = {}
    for name, (_, folder) in sources.items():
        dest = tmp_path_factory.mktemp("ane") / name
        pipeline.convert(folder, dest, ConvertOptions.from_mapping({
            "context_length": 64, "batch_size": 8, "chunks": 2, "lut_embeddings": "none", "lut_ffn": "none",
            "lut_lm_head": "none"}))
        out[name] = Engine(dest, executor="portable")
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_converted_model_matches_transformers_at_every_position(name, engines, reference_logits):
    engine, want = engines[name], reference_logits[name].double().numpy()
    assert engine.layout.sliding_window == WINDOW
    session = engine.new_session()
    got = {19: engine.feed(session, IDS[:20])}  # two batches of 8 through prefill, 4 through infer
    for i in range(20, len(IDS)):
        got[i] = engine.feed(session, [IDS[i]])
    worst = max(abs(logits.astype("float64") - want[i]).max() for i, logits in got.items())
    assert worst < 0.05, worst  # fp16 parts
