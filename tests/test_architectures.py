"""What each architecture computes is what its config asks for: every config
key that changes the computation and that the chosen architecture does not
implement is refused at planning by name (even with --architecture forcing
one), and Mistral's sliding window, its K/V in a ring cache (32 slots here),
matches transformers on sequences several times longer than the window."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from anemlld.convert import pipeline
from shared.errors import BadInput
from anemlld.runtime.sampling import SamplingParams
from shared.options import ConvertOptions
from tests.conftest import make_tiny_model


def with_config(src, dest, **changes):
    shutil.copytree(src, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg.update(changes)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def plan(folder, **options):
    return pipeline.plan(folder, ConvertOptions.from_mapping({"context_length": 64, **options}))


def test_a_mistral_window_shorter_than_the_context_is_refused_when_forced_to_llama(tiny_models):
    with pytest.raises(BadInput, match=r"sliding_window = 4: attention limited to the last 4 tokens") as info:
        plan(tiny_models["mistral"], architecture="llama")
    assert "context_length = 4 or less" in info.value.hint
    assert plan(tiny_models["mistral"], architecture="llama", context_length=4, batch_size=4).architecture == "llama"
    assert plan(tiny_models["mistral"]).architecture == "mistral"


@pytest.mark.parametrize("changes, key", [
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"layer_types": ["sliding_attention", "full_attention", "full_attention"]}, "layer_types"),
    ({"residual_multiplier": 0.22}, "residual_multiplier"),
    ({"no_rope_layers": [1, 1, 0]}, "no_rope_layers"),
    ({"sliding_window": 16, "use_sliding_window": True}, "sliding_window"),
])
def test_config_keys_that_change_the_computation_and_are_not_implemented_are_refused_by_name(
        tiny_models, tmp_path, changes, key):
    folder = with_config(tiny_models["llama"], tmp_path / "m", **changes)
    with pytest.raises(BadInput, match=f"config.json sets {key} = ") as info:
        plan(folder)
    assert "llama does not implement" in info.value.message and info.value.hint


def test_phi3_longrope_past_its_original_length_is_refused_with_the_length_to_use(tiny_models):
    with pytest.raises(BadInput, match="longer than this model's original 256 positions") as info:
        plan(tiny_models["phi3"], context_length=512)
    assert "context_length = 256 or less" in info.value.hint
    assert plan(tiny_models["phi3"], context_length=256).architecture == "phi3"


def test_phi3s_fused_checkpoint_tensors_are_checked_with_their_fused_shapes(tiny_models, tmp_path):
    from anemlld.convert.models import build
    from anemlld.convert.pipeline import plan as make_plan

    p = make_plan(tiny_models["phi3"], ConvertOptions.from_mapping({"context_length": 64}))
    with torch.device("meta"):
        shapes = build("phi3", p.args, context_length=1).checkpoint_shapes()
    assert shapes["model.layers.0.self_attn.qkv_proj.weight"] == (64 + 2 * 32, 64)
    assert shapes["model.layers.0.mlp.gate_up_proj.weight"] == (2 * 128, 64)
    assert "model.layers.0.self_attn.q_proj.weight" not in shapes


def test_keys_that_ask_for_nothing_more_are_accepted(tiny_models, tmp_path):
    folder = with_config(tiny_models["qwen2"], tmp_path / "q", sliding_window=4, use_sliding_window=False,
                         layer_types=["full_attention", "full_attention"], partial_rotary_factor=1.0,
                         attn_logit_softcapping=None)
    assert plan(folder).architecture == "qwen2"


CONVERTED = {"gemma3": dict(sliding_window=8), "mistral": dict(sliding_window=8), "phi3": dict(sliding_window=8)}


@pytest.fixture(scope="module", params=sorted(CONVERTED))
def converted_engine(request, tmp_path_factory):
    """A tiny model of the architecture with a window of 8, converted without
    LUT and run by the portable executor: (its HF folder, the engine)."""
    from anemlld.runtime.engine import Engine

    arch = request.param
    src = make_tiny_model(arch, tmp_path_factory.mktemp("hf") / arch, seed=3, **CONVERTED[arch])
    out = tmp_path_factory.mktemp("ane") / f"{arch}-ane"
    pipeline.convert(src, out, ConvertOptions.from_mapping({"context_length": 64, "batch_size": 16,
                                                            "lut_embeddings": "none", "lut_ffn": "none",
                                                            "lut_lm_head": "none"}))
    return src, Engine(out, executor="portable")


def assert_matches(engine, ref, prompt: list[int], steps: int, tolerance: float = 0.05) -> None:
    """Prefill ``prompt``, then ``steps`` single tokens: each step's logits
    within ``tolerance`` of transformers' (fp32), the greedy token the same
    away from near-ties (fp16 parts may flip those)."""
    from anemlld.runtime.sampling import Sampler, SamplingParams

    session = engine.new_session()
    logits = engine.feed(session, prompt)
    ids, greedy = list(prompt), Sampler(SamplingParams())
    for step in range(steps):
        with torch.no_grad():
            want = ref(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0, -1]
        assert abs(logits.astype("float64") - want.double().numpy()).max() < tolerance, step
        top2 = torch.topk(want, 2).values
        if float(top2[0] - top2[1]) > tolerance:
            assert greedy(logits, ids, []) == int(want.argmax()), step
        ids.append(int(want.argmax()))
        logits = engine.feed(session, ids[-1:])


def test_converted_models_with_a_window_of_8_match_transformers_over_40_tokens(converted_engine):
    from transformers import AutoModelForCausalLM

    src, engine = converted_engine
    assert engine.layout.params["sliding_window"] == 8 and engine.layout.ring_size == 32  # 8 + 16, whole batches
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    prompt = [0, 17, 300, 52, 99, 1000, 7, 2048, 11, 5, 900, 33, 61, 402, 18, 7, 77, 2500, 3, 1200]
    assert_matches(engine, ref, prompt, 20)  # a batch of 16 through prefill, 4 through infer, then 20 tokens


def test_anemlld_verify_finds_each_converted_architecture_close_to_transformers(converted_engine):
    from anemlld.runtime.verify import verify

    _, engine = converted_engine
    report = verify(engine.layout.root, max_tokens=100, engine=engine)
    assert report.tokens >= 90 and report.greedy_agreement > 0.9
    assert abs(report.perplexity / report.reference_perplexity - 1) < 0.02 and report.max_abs_logit_diff < 0.2


def test_the_daemons_worker_serves_each_new_architecture_with_the_engines_greedy_tokens(converted_engine, tmp_path):
    """Through the service and a worker process, as the daemon serves a model."""
    import dataclasses

    from anemlld.registry import Registry
    from anemlld.residency import Residency
    from anemlld.service import Service
    from shared import protocol
    from shared.settings import Settings
    from tests.test_worker import Recorder, finished

    _, engine = converted_engine
    prompt = "The shell reads a line of input"
    want = engine.complete(prompt=prompt, params=SamplingParams(max_tokens=12)).token_ids
    settings = dataclasses.replace(Settings.load(home=tmp_path / "home"), memory_budget=0)
    registry = Registry()
    registry.upsert("m", state="ready", path=str(engine.layout.root), size_bytes=1 << 20)
    residency = Residency(settings, registry)  # the daemon's: a worker process
    try:
        rec = Recorder()
        Service(settings, registry, residency).generate(
            protocol.Generate(id="a", model="m", prompt=prompt, max_tokens=12, temperature=0.0), rec)
        finished(rec, timeout=60)
        assert rec.failure is None and rec.tokens == want and len(want) == 12
        assert residency.ps()[0]["pid"] is not None
    finally:
        residency.stop()
