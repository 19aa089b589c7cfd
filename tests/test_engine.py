"""Converted packages generating text through the portable executor, checked
against the ANE-shaped torch model and transformers."""
from __future__ import annotations

import json
import logging
import shutil
import threading

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from anemlld.convert import lut, pipeline
from anemlld.convert.source import HFSource
from anemlld.residency import ResidentModel
from anemlld.runtime.engine import Detokenizer, Done, Engine, Token, sampling_defaults
from anemlld.runtime.sampling import Sampler, SamplingParams
from shared.errors import BadInput
from shared.options import ConvertOptions
from tests.ane_reference import chained, greedy
from tests.conftest import DEMO_MODEL

CTX, BATCH = 256, 32
QUESTION = [{"role": "user", "content": "What does the tar command do?"}]


@pytest.fixture(scope="module")
def pico(tmp_path_factory):
    """pico-llama with LUT 6 FFN and head, 2 chunks, as the issue asks."""
    out = tmp_path_factory.mktemp("pico") / "pico-ane"
    opts = ConvertOptions.from_mapping({"context_length": CTX, "batch_size": BATCH, "chunks": 2,
                                        "lut_ffn": 6, "lut_lm_head": 6, "lut_embeddings": "none"})
    pipeline.convert(DEMO_MODEL, out, opts)
    return out


@pytest.fixture(scope="module")
def engine(pico):
    return Engine(pico, executor="portable")


@pytest.fixture(scope="module")
def reference(pico):
    """The ANE-shaped torch model (fp32) with the same dequantized weights."""
    ends, parts, cache = chained("llama", HFSource.open(DEMO_MODEL), chunks=2, ctx=CTX)
    for part in parts:
        lut.quantize_module(part, 6, 16, nn.Conv2d)
    lut.quantize_module(ends.lm_head, 6, 16, nn.Conv2d)
    return ends, parts, cache


def same_until_a_near_tie(ours: list[int], theirs: list[int], gaps: list[float], tie: float = 0.05) -> int:
    """How many leading tokens agree; a disagreement is only allowed at a step
    whose top-two gap in the reference is a near-tie (fp16 may flip it)."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            assert gaps[i] < tie, f"token {i} differs ({a} vs {b}) with a clear gap {gaps[i]:.3f}"
            return i
    return min(len(ours), len(theirs))


def test_chat_turn_matches_the_torch_model_with_the_same_lut_weights(engine, reference):
    ends, parts, cache = reference
    prompt = engine.encode(messages=QUESTION)
    assert len(prompt) < BATCH  # all through infer here; the batch path is tested below
    done = engine.complete(messages=QUESTION, params=SamplingParams(max_tokens=32))
    cache.zero_()
    want, gaps = greedy(ends, parts, prompt, len(done.token_ids) + 1)
    agreed = same_until_a_near_tie(done.token_ids, want, gaps)
    assert agreed == len(done.token_ids) >= 5
    if done.stats.done_reason == "stop":  # the reference also ends the answer there
        assert want[len(done.token_ids)] in engine.eos
    assert "tar" in done.text.lower()


def test_prefill_batches_and_single_tokens_give_the_torch_models_tokens(engine, reference):
    ends, parts, cache = reference
    text = ("The shell reads a line of input, splits it into words, and looks up the first word as a "
            "command. Files are organized in a single tree rooted at the slash directory, and every file "
            "has an owner, a group and a set of permission bits that say who may read it.")
    prompt = engine.encode(prompt=text)
    assert len(prompt) > 2 * BATCH  # two prefill batches, then single tokens
    done = engine.complete(prompt=text, params=SamplingParams(max_tokens=24))
    assert done.stats.prefill_tokens == len(prompt)
    cache.zero_()
    want, gaps = greedy(ends, parts, prompt, 24)
    assert same_until_a_near_tie(done.token_ids, want, gaps) >= 16


def test_second_turn_prefills_only_new_tokens_and_matches_a_fresh_run(engine):
    session = engine.new_session()
    first = engine.complete(messages=QUESTION, params=SamplingParams(max_tokens=40), session=session)
    turn1 = len(engine.encode(messages=QUESTION)) + len(first.token_ids)
    convo = QUESTION + [{"role": "assistant", "content": first.text},
                        {"role": "user", "content": "And what does ls do?"}]
    second = engine.complete(messages=convo, params=SamplingParams(max_tokens=40), session=session)
    s = second.stats
    assert s.cached_tokens >= turn1 - 1  # everything the first turn put in the cache is reused
    assert s.prefill_tokens == s.prompt_tokens - s.cached_tokens < s.prompt_tokens // 2
    fresh = engine.complete(messages=convo, params=SamplingParams(max_tokens=40))
    assert fresh.stats.cached_tokens == 0
    assert second.token_ids == fresh.token_ids and second.text == fresh.text


def test_prompt_longer_than_the_context_is_cut_from_the_front_and_reported(engine):
    words = " ".join(f"word{i}" for i in range(400))
    assert len(engine.encode(prompt=words)) > CTX
    done = engine.complete(prompt=words, params=SamplingParams(max_tokens=8))
    s = done.stats
    assert s.truncated_tokens > 0 and s.prompt_tokens - s.truncated_tokens <= CTX - 8
    assert s.completion_tokens == 8 and s.done_reason == "length"


def test_decoding_past_the_context_shifts_and_keeps_going(engine):
    prompt = "The " * 150
    done = engine.complete(prompt=prompt, params=SamplingParams(max_tokens=200, temperature=0.8, seed=1))
    assert done.stats.completion_tokens == 200 and done.stats.context_shifts >= 1


def test_cancel_stops_between_tokens(engine):
    cancel = threading.Event()
    events = []
    for ev in engine.generate(prompt="The shell", params=SamplingParams(max_tokens=100, temperature=1.0, seed=3),
                              cancel=cancel):
        events.append(ev)
        if isinstance(ev, Token) and len(events) == 3:
            cancel.set()
    done = events[-1]
    assert isinstance(done, Done) and done.stats.done_reason == "cancelled"
    assert done.stats.completion_tokens == 3


def test_stop_strings_end_the_answer_without_the_stop_text(engine):
    free = engine.complete(messages=QUESTION, params=SamplingParams(max_tokens=32))
    word = free.text.split()[1]  # stop at the answer's second word
    done = engine.complete(messages=QUESTION, params=SamplingParams(max_tokens=32, stop=(word,)))
    assert done.stats.done_reason == "stop"
    assert word not in done.text and free.text.startswith(done.text)


def test_sampling_is_seeded_and_its_limits_reduce_to_greedy(engine):
    p = dict(prompt="The tar program", params=None)
    greedy_ids = engine.complete(prompt=p["prompt"], params=SamplingParams(max_tokens=12)).token_ids
    a = engine.complete(prompt=p["prompt"], params=SamplingParams(max_tokens=12, temperature=1.2, seed=7)).token_ids
    b = engine.complete(prompt=p["prompt"], params=SamplingParams(max_tokens=12, temperature=1.2, seed=7)).token_ids
    assert a == b
    top1 = engine.complete(prompt=p["prompt"], params=SamplingParams(max_tokens=12, temperature=1.5, top_k=1,
                                                                      seed=1)).token_ids
    assert top1 == greedy_ids
    nucleus = engine.complete(prompt=p["prompt"], params=SamplingParams(max_tokens=12, temperature=1.5,
                                                                         top_p=1e-6, seed=1)).token_ids
    assert nucleus == greedy_ids


def test_repetition_penalty_and_sampler_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.2], dtype=np.float32))
    s = Sampler(SamplingParams(temperature=1.0, seed=0))
    counts = np.bincount([s(logits, []) for _ in range(4000)], minlength=3) / 4000
    assert np.allclose(counts, [0.5, 0.3, 0.2], atol=0.03)
    penal = Sampler(SamplingParams(repetition_penalty=10.0))
    assert penal(np.array([2.0, 1.0, 0.5]), [0]) == 1  # the seen top token is pushed down
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(max_tokens=0)):
        with pytest.raises(BadInput):
            SamplingParams(**bad)


def test_presence_and_frequency_penalties_subtract_per_answer_token_not_per_prompt_token():
    logits = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    s = Sampler(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    after = s.penalized(logits, context=[0, 0, 1, 2, 3], generated=[3, 3, 3, 1])
    # token 3 three times: 4 - 3*0.25 - 0.5; token 1 once: 2 - 0.25 - 0.5; the prompt's 0 and 2 untouched
    assert after.tolist() == [1.0, 1.25, 3.0, 2.75]
    for bad in (dict(presence_penalty=2.5), dict(frequency_penalty=-2.01)):
        with pytest.raises(BadInput):
            SamplingParams(**bad)
    assert SamplingParams(presence_penalty=-2, frequency_penalty=2).frequency_penalty == 2


def test_a_frequency_penalty_changes_a_greedy_choice_only_once_the_token_repeats_in_the_answer():
    logits = np.array([5.0, 4.5, 0.0])
    s = Sampler(SamplingParams(frequency_penalty=0.3))
    assert s(logits, [0, 0, 0], []) == 0  # the prompt does not count
    assert s(logits, [0], [0]) == 0       # 5 - 0.3 still beats 4.5
    assert s(logits, [0, 0], [0, 0]) == 1  # 5 - 0.6 does not
    assert Sampler(SamplingParams())(logits, [0, 0], [0, 0]) == 0


def test_generation_config_gives_defaults_the_way_transformers_reads_it(pico, tmp_path, caplog):
    assert Engine(pico, executor="portable", warmup=False).sampling_defaults == {"temperature": 0.0,
                                                                                 "max_tokens": 128}
    cases = [
        ({"temperature": 0.7, "top_p": 0.9}, {"temperature": 0.0, "top_p": 0.9}),  # no do_sample: greedy
        ({"do_sample": True, "temperature": 0.7, "top_k": 20, "repetition_penalty": 1.1},
         {"temperature": 0.7, "top_k": 20, "repetition_penalty": 1.1}),
        ({"do_sample": True}, {"temperature": 1.0}),
        ({"do_sample": True, "temperature": -1, "top_p": 0, "top_k": 2.5, "max_new_tokens": True},
         {}),
    ]
    for config, want in cases:
        (tmp_path / "generation_config.json").write_text(json.dumps(config))
        with caplog.at_level(logging.WARNING, logger="anemlld.runtime.engine"):
            assert sampling_defaults(tmp_path) == want, config
    assert sum("ignoring" in r.getMessage() for r in caplog.records) == 4
    (tmp_path / "generation_config.json").unlink()
    assert sampling_defaults(tmp_path) == {}


def test_state_bytes_from_the_layout_is_what_the_portable_state_takes(engine):
    state = engine.new_session().state
    assert engine.state_bytes == sum(t.nbytes for t in state.values()) == 2 * 4 * 2 * CTX * 32 * 2


def test_after_an_answer_the_state_holds_the_prompt_and_every_answer_token_that_was_run(engine):
    session = engine.new_session()
    ids = engine.encode(messages=QUESTION)
    done = engine.complete(messages=QUESTION, params=SamplingParams(max_tokens=5), session=session)
    assert done.stats.done_reason == "length"
    assert session.tokens == ids + done.token_ids[:-1]  # the last one sampled was never run


def resident(engine: Engine, **bounds) -> ResidentModel:
    model = ResidentModel(type("Entry", (), {"name": engine.name})(), 0, False, 0.0, threading.Lock(), **bounds)
    model.engine = engine
    return model


def run(model: ResidentModel, **kw) -> Done:
    *_, done = model.generate(options={"max_tokens": 40}, **kw)
    return done


def test_a_stateless_second_chat_turn_prefills_only_what_is_new_and_answers_as_a_fresh_run(engine):
    model = resident(engine)
    first = run(model, messages=QUESTION)
    convo = QUESTION + [{"role": "assistant", "content": first.text},
                        {"role": "user", "content": "And what does ls do?"}]
    second = run(model, messages=convo)
    s = second.stats
    assert s.cached_tokens >= first.stats.prompt_tokens + len(first.token_ids) - 1, (s, first.stats)
    assert s.prefill_tokens == s.prompt_tokens - s.cached_tokens
    fresh = run(resident(engine, cache_states=0), messages=convo)
    assert fresh.stats.cached_tokens == 0
    assert second.token_ids == fresh.token_ids and second.text == fresh.text


def test_a_hit_that_ends_mid_batch_gives_the_same_greedy_answer_as_no_hit(engine):
    shared = ("The shell reads a line of input, splits it into words, and looks up the first word as a "
              "command. Files are organized in a single tree rooted at the slash directory")
    model = resident(engine)
    run(model, prompt=shared + ", and every file has an owner.")
    prompt = shared + ("; a pipe connects the output of one program to the input of the next, so small tools "
                       "that each do one thing well can be combined into larger ones without writing a new "
                       "program, and the shell expands wildcards before the command ever sees them")
    hit = run(model, prompt=prompt, session_id="other")
    # the rest starts off the batch grid and is long enough to run through prefill as well as infer
    assert hit.stats.cached_tokens % BATCH and hit.stats.prefill_tokens > BATCH, hit.stats
    miss = run(resident(engine, cache_states=0), prompt=prompt)
    assert hit.token_ids == miss.token_ids and miss.stats.cached_tokens == 0


def test_detokenizer_never_emits_broken_utf8(engine):
    tok = engine.tokenizer
    text = "naïve café 日本語 🙂 ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    d = Detokenizer(tok)
    pieces = [d.add(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_detokenizer_holds_back_a_possible_stop_string(engine):
    tok = engine.tokenizer
    ids = tok("alpha beta STOP gamma", add_special_tokens=False)["input_ids"]
    d = Detokenizer(tok, stops=("STOP",))
    out = ""
    for i in ids:
        out += d.add(i)
        if d.stopped:
            break
    assert d.stopped and out == "alpha beta " and d.answer == "alpha beta "
    assert d.flush() == "" and d.answer == "alpha beta "


def test_anemll_style_folder_loads_by_its_meta_yaml_alone(pico, tmp_path):
    """Files named as ANEMLL names them, meta.yaml as ANEMLL writes it (no
    fields of ours, compiled names), none of our manifest."""
    folder = tmp_path / "anemll-model"
    shutil.copytree(pico, folder)
    (folder / "anemlld.json").unlink()
    meta = yaml.safe_load((folder / "meta.yaml").read_text())
    p = meta["model_info"]["parameters"]
    for key in ("lm_head_chunk_sizes", "state_length", "vocab_size", "lut_group_size", "model_type", "num_logits",
                "argmax_in_model", "prefill_dynamic_slice", "update_mask_prefill", "lut_ffn_per_channel",
                "lut_lmhead_per_channel", "lut_embeddings_per_channel"):
        p.pop(key, None)  # what 0.3.4 does not write
    for key in ("embeddings", "lm_head", "ffn"):
        p[key] = p[key].replace(".mlpackage", ".mlmodelc")
    meta["model_info"]["version"] = "0.3.4"
    (folder / "meta.yaml").write_text(yaml.safe_dump(meta))
    engine = Engine(folder, executor="portable")
    assert engine.complete(messages=QUESTION, params=SamplingParams(max_tokens=6)).stats.completion_tokens > 0


@pytest.fixture(scope="module")
def tiny_plain(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "tiny-ane"
    opts = ConvertOptions.from_mapping({"context_length": 64, "batch_size": 16, "chunks": 2, "lut_ffn": "none",
                                        "lut_lm_head": "none", "lut_embeddings": "none"})
    pipeline.convert(tiny_models["llama"], out, opts)
    return out


def test_unquantized_package_reproduces_torch_and_transformers(tiny_plain, tiny_models):
    from transformers import AutoModelForCausalLM

    engine = Engine(tiny_plain, executor="portable")
    prompt = [0, 17, 300, 52, 99, 1000, 7, 2048]
    session = engine.new_session()
    logits = engine.feed(session, prompt)
    hf = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    ends, parts, _ = chained("llama", HFSource.open(tiny_models["llama"]), chunks=2, ctx=64)
    want, gaps = greedy(ends, parts, prompt, 32)
    ids, worst, ours = list(prompt), 0.0, []
    with torch.no_grad():
        for _ in range(32):
            ref = hf(torch.tensor([ids])).logits[0, -1].numpy()
            worst = max(worst, float(np.abs(logits - ref).max()))
            ours.append(int(logits.argmax()))
            ids.append(ours[-1])
            logits = engine.feed(session, [ours[-1]])
    scale = float(np.abs(ref).max())
    assert worst < 0.01 * scale + 0.02, (worst, scale)  # fp16 rounding, not a wrong computation
    assert same_until_a_near_tie(ours, want, gaps) >= 16


def test_portable_executor_refuses_a_compiled_only_folder(pico, tmp_path):
    from shared.errors import AnemllError

    folder = tmp_path / "compiled"
    shutil.copytree(pico, folder)
    for pkg in folder.glob("*.mlpackage"):
        pkg.rename(pkg.with_suffix(".mlmodelc"))
    with pytest.raises(AnemllError, match="only compiled"):
        Engine(folder, executor="portable")


def test_verify_reports_closeness_to_the_original(pico):
    from anemlld.runtime.verify import verify

    report = verify(pico, reference=DEMO_MODEL, max_tokens=160, executor="portable")
    assert report.tokens >= 150
    assert abs(report.perplexity / report.reference_perplexity - 1) < 0.05  # LUT 6 costs little
    assert report.greedy_agreement > 0.9
    assert 0 < report.max_abs_logit_diff < 5
    assert json.loads(json.dumps(report.as_dict()))["perplexity"] == round(report.perplexity, 4)
