"""Monolithic models (``monolithic = true``): one package with the
embeddings, every layer and the head, functions ``infer`` and ``prefill``
with ANEMLL's input and output names; inspected, run by the portable
executor against transformers, counted in predictions per token, refused
past max_chunk_mb; and ANEMLL's own monolithic folders served."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from anemlld import layout
from anemlld.convert import pipeline
from anemlld.runtime.engine import Engine
from anemlld.runtime.sampling import SamplingParams
from shared.errors import BadInput
from shared.options import ConvertOptions
from tests.anemll_folders import (agree_until_a_near_tie, anemll_monolithic_argmax_folder, anemll_monolithic_folder,
                                  edit_meta, hf_greedy)

PROMPT = [0, 17, 300, 52, 99, 1000, 7, 2048, 11, 5, 900, 33, 61, 402, 18, 7, 77, 2500, 3, 1200]  # 16 + 4
BASE = {"context_length": 64, "batch_size": 16, "lut_embeddings": "none", "lut_ffn": "none", "lut_lm_head": "none"}


@pytest.fixture(scope="module")
def mono(tiny_monolithic) -> Path:
    return tiny_monolithic


def test_one_package_with_infer_and_prefill_and_anemlls_names(mono):
    import coremltools as ct

    assert sorted(p.name for p in mono.glob("*.mlpackage")) == ["llama_monolithic_full.mlpackage"]
    spec = ct.utils.load_spec(str(mono / "llama_monolithic_full.mlpackage"))
    functions = {f.name: f for f in spec.description.functions}
    assert list(functions) == ["infer", "prefill"] and spec.description.defaultFunctionName == "infer"
    for name, seq in (("infer", 1), ("prefill", 16)):
        fn = functions[name]
        inputs = {i.name: list(i.type.multiArrayType.shape) for i in fn.input}
        assert inputs == {"input_ids": [1, seq], "position_ids": [seq], "causal_mask": [1, 1, seq, 64],
                          "current_pos": [1]}
        assert [o.name for o in fn.output] == [f"logits{i + 1}" for i in range(8)]
        (state,) = fn.state  # every layer's K and V: (2 x 3 layers, kv heads, context, head_dim)
        assert list(state.type.stateType.arrayType.shape) == [6, 2, 64, 16]
    meta = dict(spec.description.metadata.userDefined)
    assert meta["com.anemll.functions"] == "infer,prefill" and meta["com.anemll.num_chunks"] == "1"
    params = yaml.safe_load((mono / "meta.yaml").read_text())["model_info"]["parameters"]
    assert params["model_type"] == "monolithic" and params["monolithic_model"] == "llama_monolithic_full.mlpackage"
    assert params["lut_bits"] == "none" and params["state_length"] == 64
    assert not {"embeddings", "lm_head", "ffn", "num_chunks"} & set(params)


def test_greedy_tokens_match_transformers_with_one_prediction_per_token(mono, tiny_models):
    engine = Engine(mono, executor="portable")
    done = engine.complete(ids=PROMPT, params=SamplingParams(max_tokens=16))
    want, gaps = hf_greedy(tiny_models["llama"], PROMPT, 16)
    assert agree_until_a_near_tie(done.token_ids, want, gaps) >= 8
    assert done.stats.predictions_per_token == 1.0
    assert done.stats.predictions == 1 + 4 + 15  # a prefill batch of 16, 4 through infer, 15 decoding steps


def test_a_monolithic_model_above_max_chunk_mb_is_refused_before_any_work(tiny_models, tmp_path):
    with pytest.raises(BadInput, match="monolithic .* above max_chunk_mb = 1") as info:
        pipeline.convert(tiny_models["llama"], tmp_path / "big", ConvertOptions.from_mapping(
            {**BASE, "monolithic": True, "max_chunk_mb": 1}))
    assert "leave out monolithic" in info.value.hint and not (tmp_path / "big").exists()


@pytest.mark.parametrize("options, needle", [
    ({"monolithic": True, "argmax_in_model": True}, "argmax_in_model"),
    ({"monolithic": True, "chunks": 2}, "chunks = 2"),
    ({"monolithic": "maybe"}, "monolithic = 'maybe'"),
])
def test_options_that_do_not_go_with_monolithic_are_refused(options, needle):
    with pytest.raises(BadInput, match=needle):
        ConvertOptions.from_mapping({**BASE, **options})


@pytest.fixture(scope="module")
def theirs(mono, tmp_path_factory) -> Path:
    return anemll_monolithic_folder(mono, tmp_path_factory.mktemp("anemll") / "anemll-mono")


def test_anemlls_monolithic_folder_is_served_and_matches_transformers(theirs, tiny_models):
    engine = Engine(theirs, executor="portable")
    assert engine.layout.monolithic and [p.name for p in engine.layout.parts(".mlpackage")] == [
        "llama_monolithic_full.mlpackage"]
    done = engine.complete(ids=PROMPT, params=SamplingParams(max_tokens=16))
    want, gaps = hf_greedy(tiny_models["llama"], PROMPT, 16)
    assert agree_until_a_near_tie(done.token_ids, want, gaps) >= 8


def test_anemlls_monolithic_argmax_folder_decodes_greedily_and_refuses_sampling(tiny_monolithic, tiny_models,
                                                                                tmp_path):
    import coremltools as ct

    folder = anemll_monolithic_argmax_folder(tiny_monolithic, tiny_models["llama"], tmp_path / "mono-argmax")
    spec = ct.utils.load_spec(str(folder / "llama_monolithic_full.mlpackage"))
    assert {f.name: [o.name for o in f.output] for f in spec.description.functions} == {
        "infer": ["argmax_idx", "argmax_val"], "prefill": ["argmax_idx", "argmax_val"]}
    engine = Engine(folder, executor="portable")
    done = engine.complete(ids=PROMPT, params=SamplingParams(max_tokens=16))
    want, gaps = hf_greedy(tiny_models["llama"], PROMPT, 16)
    assert agree_until_a_near_tie(done.token_ids, want, gaps) >= 8
    assert done.stats.predictions_per_token == 1.0
    with pytest.raises(BadInput, match="--argmax"):
        engine.complete(ids=PROMPT, params=SamplingParams(temperature=0.5))


def test_a_monolithic_meta_yaml_without_its_model_is_refused_naming_the_key(theirs, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(theirs, folder)
    edit_meta(folder, monolithic_model=None)
    with pytest.raises(BadInput, match="monolithic_model"):
        layout.read_meta(folder)
