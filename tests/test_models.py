"""The ANE-shaped torch models against transformers on the same weights."""
from __future__ import annotations

import json

import pytest
import torch

from anemlld.convert.models.base import ModelArgs, rope_inv_freq, rope_scaling, rope_theta
from anemlld.convert.source import HFSource
from tests.conftest import ARCHS

from tests.ane_reference import chained, run


@pytest.fixture(scope="module")
def references(tiny_models):
    from transformers import AutoModelForCausalLM

    return {a: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for a, p in tiny_models.items()}


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_chunked_ane_model_matches_transformers_over_prompt_and_16_cached_steps(arch, tiny_models, references):
    src = HFSource.open(tiny_models[arch])
    ends, parts, _ = chained(arch, src, chunks=2)
    ref = references[arch]
    ids = [0, 17, 300, 52, 99, 1000, 7, 2048]
    logits = run(ends, parts, ids, 0)
    worst = 0.0
    for _ in range(16):
        expected = ref(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0, -1]
        worst = max(worst, (logits - expected).abs().max().item())
        assert int(logits.argmax()) == int(expected.argmax())
        ids.append(int(expected.argmax()))
        logits = run(ends, parts, ids[-1:], len(ids) - 1)  # one token through the KV cache
    assert worst < 1e-3, worst
    # the sequence is not degenerate: greedy decoding produced varied tokens
    assert len(set(ids[8:])) > 2


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_prefill_and_single_token_paths_fill_the_same_cache(arch, tiny_models):
    src = HFSource.open(tiny_models[arch])
    ids = [0, 5, 9, 400, 33, 2, 77, 1500, 12, 8]
    ends, parts, cache_batch = chained(arch, src, chunks=1)
    batch_logits = run(ends, parts, ids, 0)
    cache_batch = cache_batch.clone()
    ends, parts, cache_step = chained(arch, src, chunks=1)
    for i, t in enumerate(ids):
        step_logits = run(ends, parts, [t], i)
    n = len(ids)
    torch.testing.assert_close(cache_step[:, :, :n], cache_batch[:, :, :n], atol=1e-5, rtol=1e-5)
    assert cache_batch[:, :, :n].abs().sum() > 0
    torch.testing.assert_close(step_logits, batch_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch,name", [("llama", "pico-llama"), ("qwen3", "pico-qwen3")])
def test_trained_pico_models_match_transformers(arch, name):
    """The trained models, when the team folder is there (CI has it beside the clone)."""
    from tests.conftest import SHARED_MODELS

    if not (SHARED_MODELS / name).is_dir():
        pytest.skip(f"no {name} in {SHARED_MODELS}")
    from transformers import AutoModelForCausalLM

    src = HFSource.open(SHARED_MODELS / name)
    ends, parts, _ = chained(arch, src, chunks=2)
    ref = AutoModelForCausalLM.from_pretrained(SHARED_MODELS / name, dtype=torch.float32).eval()
    ids = [0, 791, 1181, 295, 264, 1052]
    with torch.no_grad():
        got = run(ends, parts, ids, 0)
        want = ref(torch.tensor([ids])).logits[0, -1]
    assert (got - want).abs().max().item() < 1e-3


def test_rope_settings_are_read_from_both_config_styles():
    old = {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    new = {"rope_parameters": {"rope_theta": 500000.0, **old["rope_scaling"]}}
    assert rope_theta(old) == rope_theta(new) == 500000.0
    drop_theta = lambda d: {k: v for k, v in d.items() if k != "rope_theta"}
    assert drop_theta(rope_scaling(old)) == drop_theta(rope_scaling(new))
    assert rope_scaling({"rope_parameters": {"rope_type": "default", "rope_theta": 1.0}}) is None


def test_llama3_rope_frequencies_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_parameters=params)
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    args = ModelArgs.from_config(json.loads(cfg.to_json_string()))
    got = rope_inv_freq(args).float()
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)
    assert not torch.allclose(got, rope_inv_freq(ModelArgs.from_config({**json.loads(cfg.to_json_string()),
                                                                        "rope_parameters": {"rope_theta": 500000.0}})).float())
