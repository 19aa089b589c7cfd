"""Gemma 3: the configs it comes in (transformers 5's rope_parameters per layer
type, older files' rope_local_base_freq and sliding_window_pattern, the
multimodal checkpoint's text part) give the model transformers computes; what
it does not implement is refused by name; a model whose residual stream
passes fp16's range (transformers in fp16 gives non-finite logits) is
rescaled at conversion and, converted, still matches the fp32 reference.
Converted Gemma 3 with a window shorter than the test sequences is checked
beside Mistral and Phi-3 in test_architectures.py."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from anemlld.convert import pipeline
from anemlld.convert.models import build
from anemlld.convert.models.base import causal_mask
from anemlld.convert.source import HFSource
from shared.errors import BadInput
from shared.options import ConvertOptions
from tests.conftest import make_tiny_model
from tests.test_architectures import assert_matches, plan, with_config

PROMPT = [2, 17, 300, 52, 99, 1000, 7, 2048, 11, 5, 900, 33, 61, 402, 18, 7, 77, 2500, 3, 1200]
NO_LUT = {"context_length": 64, "batch_size": 16, "lut_embeddings": "none", "lut_ffn": "none", "lut_lm_head": "none"}


@torch.no_grad()
def torch_logits(folder, ids: list[int]) -> torch.Tensor:
    """Our fp32 torch model of ``folder`` (before any export) over ``ids``."""
    p = plan(folder)
    lm = build(p.architecture, p.args, context_length=64, lm_head_split=4)
    lm.load_weights(p.source.get)
    pos = torch.arange(len(ids))
    h = lm.layers_forward(lm.embed(torch.tensor([ids])), pos, causal_mask(pos, 64), torch.zeros(1, dtype=torch.int32),
                          causal_mask(pos, 64, window=p.args.sliding_window))
    return torch.cat(lm.head(h), -1)[0]


@torch.no_grad()
def reference_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float()


def test_the_defaults_gemma3_fills_in_are_transformers_own():
    from transformers import Gemma3TextConfig

    from anemlld.convert.models.gemma3 import DEFAULTS

    theirs = Gemma3TextConfig()
    for key, value in DEFAULTS.items():
        if key == "rope_theta":
            assert value == theirs.rope_parameters["full_attention"]["rope_theta"]
        elif key == "rope_local_base_freq":
            assert value == theirs.rope_parameters["sliding_attention"]["rope_theta"]
        elif key == "sliding_window_pattern":
            assert theirs.layer_types[value - 1] == "full_attention" and theirs.layer_types.count("full_attention") \
                == theirs.num_hidden_layers // value
        else:
            assert getattr(theirs, key) == value, key


def test_an_older_config_with_rope_local_base_freq_and_a_pattern_matches_transformers(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "old"
    shutil.copytree(tiny_models["gemma3"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    for key in ("layer_types", "rope_parameters"):
        del cfg[key]
    cfg.update(rope_theta=50000.0, rope_local_base_freq=500.0, sliding_window_pattern=2,
               rope_scaling={"rope_type": "linear", "factor": 2.0})
    (folder / "config.json").write_text(json.dumps(cfg))
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert ref.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert plan(folder).args.layer_windows == (4, None, 4)
    assert (torch_logits(folder, PROMPT) - reference_logits(ref, PROMPT)).abs().max() < 1e-4


def test_the_text_part_of_a_multimodal_gemma3_checkpoint_matches_transformers(tmp_path):
    """Weights under language_model., the vision tower skipped; tied embeddings (the
    sqrt(hidden) scale is folded into the embeddings only, not the LM head)."""
    import transformers

    text = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, sliding_window=4, rms_norm_eps=1e-5)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    torch.manual_seed(1)
    model = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=4000,
        boi_token_index=4001, eoi_token_index=4002)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5)
    model.save_pretrained(tmp_path / "mm", safe_serialization=True)
    # As the 4B checkpoint's: a text_config naming only what differs from the defaults.
    cfg = json.loads((tmp_path / "mm" / "config.json").read_text())
    cfg["text_config"] = {"model_type": "gemma3_text", **text}
    (tmp_path / "mm" / "config.json").write_text(json.dumps(cfg))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mm", dtype=torch.float32).eval()
    assert ref.config.get_text_config().query_pre_attn_scalar == 256  # transformers' default, ours too
    source = HFSource.open(tmp_path / "mm")
    assert source.config["model_type"] == "gemma3_text" and source.skipped > 10
    assert not [n for n in source.shapes if not n.startswith("model.")]
    assert (torch_logits(tmp_path / "mm", PROMPT) - reference_logits(ref, PROMPT)).abs().max() < 1e-4


@pytest.mark.parametrize("changes, key", [
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_gemma3_config_keys_we_do_not_implement_are_refused_by_name(tiny_models, tmp_path, changes, key):
    folder = with_config(tiny_models["gemma3"], tmp_path / "m", **changes)
    with pytest.raises(BadInput, match=f"config.json sets {key} = ") as info:
        plan(folder)
    assert "gemma3 does not implement" in info.value.message and info.value.hint


def hot_gemma(dest, weight: float = 130000.0):
    """The tiny Gemma 3 with one channel of layer 0's post-feedforward norm
    at ``weight``: its residual stream reaches about 2e5 there."""
    from transformers import AutoModelForCausalLM

    make_tiny_model("gemma3", dest, seed=5, sliding_window=8)
    model = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32).eval()
    with torch.no_grad():
        model.model.layers[0].post_feedforward_layernorm.weight[7] = weight
    model.save_pretrained(dest, safe_serialization=True)
    return model


def test_a_residual_stream_past_fp16s_range_is_rescaled_and_matches_fp32(tmp_path):
    from transformers import AutoModelForCausalLM

    from anemlld.runtime.engine import Engine

    ref = hot_gemma(tmp_path / "hot")
    with torch.no_grad():
        states = ref(torch.tensor([PROMPT]), output_hidden_states=True).hidden_states
        fp16 = AutoModelForCausalLM.from_pretrained(tmp_path / "hot", dtype=torch.float16).eval()
        assert not torch.isfinite(fp16(torch.tensor([PROMPT])).logits).all()  # transformers in fp16
    peak = max(float(h.abs().max()) for h in states[:-1])
    assert 1.5e5 < peak < 3e5
    events = []
    pipeline.convert(tmp_path / "hot", tmp_path / "ane", ConvertOptions.from_mapping(NO_LUT), progress=events.append)
    recorded = json.loads((tmp_path / "ane" / "anemlld.json").read_text())["fp16_range"]
    assert recorded["residual_scale"] in (1 / 8, 1 / 16, 1 / 32)
    assert recorded["residual_peak"] > 65504 and recorded["scaled_peak"] < 65504 / 4
    said = [e.message for e in events if e.stage == "calibrate" and e.message]
    assert said and f"scaled by 1/{1 / recorded['residual_scale']:g}" in said[0]
    assert_matches(Engine(tmp_path / "ane", executor="portable"), ref, PROMPT, 6, 0.1)


@pytest.mark.parametrize("model_type, cls", [("gemma3n", "Gemma3nForConditionalGeneration"),
                                             ("qwen3_moe", "Qwen3MoeForCausalLM")])
def test_a_model_type_we_do_not_know_is_refused_though_its_class_name_starts_like_ours(
        tiny_models, tmp_path, model_type, cls):
    folder = with_config(tiny_models["gemma3"], tmp_path / "m", model_type=model_type, architectures=[cls])
    with pytest.raises(BadInput, match=f"unsupported architecture '{model_type}'") as info:
        plan(folder)
    assert "gemma3" in info.value.message and "mistral" in info.value.message


def test_every_architecture_can_be_named_with_architecture(tiny_models):
    for arch in ("gemma3", "mistral", "phi3"):
        assert plan(tiny_models[arch], architecture=arch).architecture == arch


def test_an_activation_past_fp16_off_the_residual_stream_stops_the_conversion_naming_it(tmp_path):
    """Layer 0's MLP inside past 65,504 (its post-norm keeps the residual
    stream small): no residual scale helps, so the conversion says so."""
    from transformers import AutoModelForCausalLM

    from shared.errors import AnemllError

    make_tiny_model("gemma3", tmp_path / "hf", seed=5)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1e5)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    with pytest.raises(AnemllError, match=r"in layer 0\) reaches .* not on the residual stream") as info:
        pipeline.convert(tmp_path / "hf", tmp_path / "ane", ConvertOptions.from_mapping(NO_LUT))
    assert info.value.stage == "calibrate" and info.value.hint
    assert not (tmp_path / "ane").exists()


@torch.no_grad()
def test_gemma3_in_rings_of_16_slots_matches_transformers_at_every_position_of_48_tokens(tiny_models, tmp_path):
    """The window (4) in a ring of 16 slots (3 turns), local and global layers
    each with their rope, across two chunks: torch, against transformers."""
    from tests.ane_reference import chained, run
    from tests.test_sliding_window import IDS, RING, transformers_logits

    ends, parts, _ = chained("gemma3", HFSource.open(tiny_models["gemma3"]), chunks=2, ring=RING)
    want = transformers_logits(tiny_models["gemma3"], IDS)
    got = [run(ends, parts, IDS[:9], 0)] + [run(ends, parts, [t], i) for i, t in enumerate(IDS[9:], start=9)]
    assert max((g - want[i]).abs().max().item() for i, g in zip(range(8, len(IDS)), got)) < 1e-4
    wide = with_config(tiny_models["gemma3"], tmp_path / "wide", sliding_window=4096)
    assert (transformers_logits(wide, IDS)[-1] - want[-1]).abs().max().item() > 0.01  # the windows matter here
