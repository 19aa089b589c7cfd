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
    ({"monolithic": True, "chunks": 2}, "chunks = 2"),
    ({"monolithic": "maybe"}, "monolithic = 'maybe'"),
])
def test_options_that_do_not_go_with_monolithic_are_refused(options, needle):
    with pytest.raises(BadInput, match=needle):
        ConvertOptions.from_mapping({**BASE, **options})


@pytest.fixture(scope="module")
def mono_argmax(tiny_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mono-argmax") / "tiny-mono-argmax"
    pipeline.convert(tiny_models["llama"], out, ConvertOptions.from_mapping(
        {**BASE, "monolithic": True, "argmax_in_model": True}))
    return out


def test_argmax_in_model_adds_an_argmax_function_over_the_same_weights_and_anemll_reads_logits(mono_argmax, mono):
    import coremltools as ct

    pkg = mono_argmax / "llama_monolithic_full.mlpackage"
    spec = ct.utils.load_spec(str(pkg))
    functions = {f.name: f for f in spec.description.functions}
    assert list(functions) == ["infer", "prefill", "argmax"] and spec.description.defaultFunctionName == "infer"
    fields = lambda xs: [(x.name, str(x.type)) for x in xs]  # noqa: E731
    infer, argmax = functions["infer"], functions["argmax"]
    assert fields(argmax.input) == fields(infer.input) and fields(argmax.state) == fields(infer.state)
    assert [o.name for o in infer.output] == [f"logits{i + 1}" for i in range(8)]
    assert [o.name for o in argmax.output] == ["argmax_idx", "argmax_val"]
    assert spec.description.metadata.userDefined["com.anemll.functions"] == "infer,prefill,argmax"
    weights = lambda p: sum(f.stat().st_size for f in p.rglob("weight.bin"))  # noqa: E731
    assert weights(pkg) == weights(mono / "llama_monolithic_full.mlpackage")  # one copy for all three
    params = yaml.safe_load((mono_argmax / "meta.yaml").read_text())["model_info"]["parameters"]
    assert params["argmax_in_model"] is False  # ANEMLL's runner calls infer and prefill for logits
    assert params["monolithic_functions"] == "infer,prefill,argmax" and "lm_head_functions" not in params
    lay = layout.read_meta(mono_argmax)
    assert lay.monolithic_argmax_function and not lay.argmax_only


def test_greedy_decoding_runs_the_argmax_function_and_matches_transformers(mono_argmax, tiny_models, monkeypatch):
    from anemlld.runtime.portable import PortableModel

    engine = Engine(mono_argmax, executor="portable")
    calls = []
    real = PortableModel.predict_tensors
    monkeypatch.setattr(PortableModel, "predict_tensors",
                        lambda self, inputs, state=None, function=None: calls.append(function)
                        or real(self, inputs, state, function))
    done = engine.complete(ids=PROMPT, params=SamplingParams(max_tokens=16))
    want, gaps = hf_greedy(tiny_models["llama"], PROMPT, 16)
    assert agree_until_a_near_tie(done.token_ids, want, gaps) >= 8
    # a prefill batch of 16, 3 tokens through infer, then the prompt's last token and 15 decoding steps
    # through argmax: one prediction per token, as with logits
    assert calls == ["prefill"] + ["infer"] * 3 + ["argmax"] * 16
    assert done.stats.predictions_per_token == 1.0
    calls.clear()
    sampled = engine.complete(ids=PROMPT, params=SamplingParams(max_tokens=4, temperature=0.7, seed=1))
    assert len(sampled.token_ids) == 4 and "argmax" not in calls  # sampling reads the logits of infer


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
