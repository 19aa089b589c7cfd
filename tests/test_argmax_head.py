"""The argmax LM head: ours (``--argmax-in-model``: logits by default, an
``argmax`` function beside it over the same weights) and ANEMLL's
(``--argmax``: argmax only), inspected, run by the portable executor and
compared with transformers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from anemlld.convert import export
from anemlld.runtime.engine import Engine
from anemlld.runtime.sampling import SamplingParams
from shared.errors import BadInput
from tests.anemll_folders import agree_until_a_near_tie, hf_greedy

PROMPT = [0, 17, 300, 52, 99, 1000, 7, 2048, 11, 5, 900, 33, 61, 402, 18, 7, 77, 2500, 3, 1200]  # 16 + 4


@pytest.fixture(scope="module")
def ours(tiny_argmax) -> Path:
    return tiny_argmax


@pytest.fixture(scope="module")
def theirs(tiny_anemll_argmax) -> Path:
    return tiny_anemll_argmax


def test_our_head_has_logits_by_default_and_an_argmax_function_over_one_copy_of_the_weights(ours):
    import coremltools as ct

    import yaml

    head = next(ours.glob("*_lm_head*.mlpackage"))
    spec = ct.utils.load_spec(str(head))
    functions = {f.name: f for f in spec.description.functions}
    assert list(functions) == ["logits", "argmax"] and spec.description.defaultFunctionName == "logits"
    assert [o.name for o in functions["logits"].output] == [f"logits{i + 1}" for i in range(8)]
    assert [o.name for o in functions["argmax"].output] == ["argmax_idx", "argmax_val"]
    assert [i.name for i in functions["argmax"].input] == ["hidden_states"]
    assert spec.description.metadata.userDefined["com.anemll.functions"] == "logits,argmax"
    weights = sum(f.stat().st_size for f in head.rglob("weight.bin"))
    one_copy = 4096 * 64 * 2  # vocab x hidden in fp16
    assert one_copy <= weights < 1.1 * one_copy
    params = yaml.safe_load((ours / "meta.yaml").read_text())["model_info"]["parameters"]
    assert params["argmax_in_model"] is False  # ANEMLL's runners read the default function's logits
    assert params["lm_head_functions"] == "logits,argmax"


def test_a_lut_head_keeps_one_copy_of_its_tables_and_indices_across_both_functions(tmp_path):
    import torch
    from torch import nn

    from anemlld.convert import lut
    from anemlld.convert.models import build
    from anemlld.convert.models.base import ModelArgs

    args = ModelArgs(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=4, head_dim=64, vocab_size=2048, rms_norm_eps=1e-5, rope_theta=1e4,
                     rope_scaling=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    lm = build("llama", args, layers=range(0), embeddings=False, lm_head=True, lm_head_split=4, context_length=16)
    lut.quantize_module(lm, 4, 16, nn.Conv2d)
    shapes = export.Shapes(256, 16, 4)
    table = export.Lut(4, 16, "conv")
    paths = {}
    for fn, argmax in (("logits", False), ("argmax", True)):
        paths[fn] = tmp_path / f"{fn}.mlpackage"
        export.export_head(lm, shapes, table, argmax).save(str(paths[fn]))
    combined = tmp_path / "head.mlpackage"
    export.combine(paths, combined, {}, "test")

    def weights(p: Path) -> int:
        return sum(f.stat().st_size for f in p.rglob("weight.bin"))

    assert weights(combined) == weights(paths["logits"])


def test_greedy_tokens_from_the_argmax_function_match_transformers_and_the_logits(ours, tiny_models):
    engine = Engine(ours, executor="portable")
    assert engine.executor.has_argmax
    done = engine.complete(ids=PROMPT, params=SamplingParams(max_tokens=16))
    want, gaps = hf_greedy(tiny_models["llama"], PROMPT, 16)
    assert agree_until_a_near_tie(done.token_ids, want, gaps) >= 8
    assert done.stats.predictions_per_token == 4.0  # the chunked layout: embeddings, two chunks, head
    # token for token the same as the argmax of the default function's logits
    session, ex = engine.new_session(), engine.executor
    engine.feed(session, PROMPT[:-1])
    hidden = ex.embed(np.asarray([[PROMPT[-1]]], dtype=np.int32))
    pos = len(PROMPT) - 1
    hidden = ex.ffn(hidden, engine.steps.step(pos, 1, session.ring), session.state, "infer")
    assert ex.argmax(hidden) == int(np.argmax(ex.logits(hidden))) == done.token_ids[0]
    sampled = engine.complete(ids=PROMPT, params=SamplingParams(max_tokens=4, temperature=0.8, seed=1))
    assert len(sampled.token_ids) == 4  # the logits function serves sampling


def test_anemlls_argmax_only_head_and_update_mask_prefill_decode_as_transformers_and_sampling_is_refused(
        theirs, tiny_models):
    import coremltools as ct

    head = next(theirs.glob("*_lm_head*.mlpackage"))
    spec = ct.utils.load_spec(str(head))
    assert [o.name for o in spec.description.output] == ["argmax_idx", "argmax_val"]
    chunk = ct.utils.load_spec(str(next(theirs.glob("*_chunk_01of02.mlpackage"))))
    prefill = next(f for f in chunk.description.functions if f.name == "prefill")
    assert [i.name for i in prefill.input][-1] == "update_mask"
    engine = Engine(theirs, executor="portable")  # the warm-up reads no logits1
    done = engine.complete(ids=PROMPT, params=SamplingParams(max_tokens=16))
    want, gaps = hf_greedy(tiny_models["llama"], PROMPT, 16)
    assert agree_until_a_near_tie(done.token_ids, want, gaps) >= 8
    for params in (SamplingParams(temperature=0.7), SamplingParams(repetition_penalty=1.2)):
        with pytest.raises(BadInput, match="--argmax") as info:
            engine.complete(ids=PROMPT, params=params)
        assert "re-convert the model without --argmax" in info.value.hint
