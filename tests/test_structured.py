"""Structured output on real converted models (issue 15): through the real
`openai` and `ollama` clients, answers under a JSON schema parse and
validate 50 of 50 times on the trained pico and on a tiny random Qwen3 (only
possible because decoding is constrained: the random model knows no JSON),
forced tool calls are well-formed calls 20 of 20 times in both tool-call
syntaxes, a call's result goes back through the template, and everything the
grammar engine cannot do is a 400 naming it."""
from __future__ import annotations

import json
import shutil

import jsonschema
import numpy as np
import pytest

from anemlld.convert import pipeline
from anemlld.runtime.engine import Engine
from anemlld.runtime.tools import HERMES, LLAMA3, ToolUse, form_of, template_messages
from shared import protocol
from shared.errors import AnemllError
from shared.options import ConvertOptions
from shared.settings import HttpSettings
from tests import tool_templates
from tests.conftest import DEMO_MODEL, make_tiny_model
from tests.test_http import Api

OPTS = {"context_length": 256, "batch_size": 32, "lut_ffn": "none", "lut_lm_head": "none",
        "lut_embeddings": "none"}
INT = {"type": "integer", "minimum": 0, "maximum": 99}
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "ok": {"type": "boolean"}},
     "required": ["name", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": ["S", "M"]}},
     "required": ["color", "size"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "items": INT, "minItems": 1, "maxItems": 4}},
     "required": ["items"], "additionalProperties": False},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1},
                                      "count": {"type": "integer", "minimum": -5, "maximum": 5}},
     "required": ["score", "count"], "additionalProperties": False},
    {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                                  "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                                           "maxItems": 2}},
                 "required": ["id", "tags"], "additionalProperties": False},
        "active": {"type": "boolean"}}, "required": ["user", "active"], "additionalProperties": False},
    {"type": "object", "properties": {"points": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"x": INT, "y": INT}, "required": ["x", "y"], "additionalProperties": False}}},
     "required": ["points"], "additionalProperties": False},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"}},
     "required": ["code"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"const": "v1"},
                                      "ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 10}},
     "required": ["kind", "ratio"], "additionalProperties": False},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"enum": [1, 2, 3]}},
                                            "required": ["b"], "additionalProperties": False}},
     "required": ["a"], "additionalProperties": False},
    {"type": "object", "properties": {"value": {"anyOf": [INT, {"type": "null"}]},
                                      "note": {"type": "string", "maxLength": 6}},
     "required": ["value"], "additionalProperties": False},
]
PROMPTS = ["Describe a user.", "What does the tar command do?", "Give me numbers.", "Answer in JSON.", "hi"]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two numbers.",
    "parameters": {"type": "object", "properties": {"a": INT, "b": INT}, "required": ["a", "b"],
                   "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Converted pico (its template has no tools), a tiny random Qwen3 with a
    Hermes tool template, and the same model with a Llama 3.1 tool template."""
    root = tmp_path_factory.mktemp("structured")
    pipeline.convert(DEMO_MODEL, root / "pico", ConvertOptions.from_mapping(OPTS))
    hf = tool_templates.use_template(make_tiny_model("qwen3", root / "hf-qwen3"), tool_templates.HERMES)
    pipeline.convert(hf, root / "qwen3", ConvertOptions.from_mapping(OPTS))
    shutil.copytree(root / "qwen3", root / "qwen3-llama")
    tool_templates.use_template(root / "qwen3-llama", tool_templates.LLAMA3)
    return {name: root / name for name in ("pico", "qwen3", "qwen3-llama")}


@pytest.fixture(scope="module")
def engines(folders):
    return {name: Engine(path, executor="portable") for name, path in folders.items()}


@pytest.fixture(scope="module")
def api(engines, tmp_path_factory):
    a = Api(tmp_path_factory.mktemp("api"), HttpSettings(port=0), lambda entry, progress=None: engines[entry.name],
            models={name: 10 for name in engines})
    yield a
    a.close()


def requests():
    return [(schema, prompt) for schema in SCHEMAS for prompt in PROMPTS]


@pytest.mark.parametrize("model", ["pico", "qwen3"])
def test_openai_json_schema_answers_validate_50_of_50(api, model):
    client = api.openai(timeout=60)
    finished = []
    for i, (schema, prompt) in enumerate(requests()):
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=120, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema,
                                                                    "strict": True}})
        jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
        finished.append(reply.choices[0].finish_reason)
    assert finished == ["stop"] * 50


@pytest.mark.parametrize("model", ["pico", "qwen3"])
def test_ollama_format_answers_validate_50_of_50(api, model):
    client = api.ollama()
    for schema, prompt in requests():
        reply = client.chat(model=model, messages=[{"role": "user", "content": prompt}], format=schema,
                            options={"num_predict": 120, "temperature": 0.7, "seed": 1})
        jsonschema.validate(json.loads(reply.message.content), schema)
        assert reply.done_reason == "stop"


def test_json_object_mode_and_ollama_json_give_an_object(api):
    reply = api.openai().chat.completions.create(model="qwen3", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=120, response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    text = api.ollama().generate(model="pico", prompt="hi", format="json", options={"num_predict": 120}).response
    assert isinstance(json.loads(text), dict)


def test_a_streamed_schema_answer_equals_the_whole_one(api):
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMAS[4]}}
    messages = [{"role": "user", "content": "hi"}]
    client = api.openai()
    whole = client.chat.completions.create(model="pico", messages=messages, max_tokens=120, response_format=fmt)
    chunks = list(client.chat.completions.create(model="pico", messages=messages, max_tokens=120,
                                                 response_format=fmt, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_max_tokens_that_cut_the_json_say_length_and_nothing_more(api):
    reply = api.openai().chat.completions.create(
        model="pico", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMAS[4]}})
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3
    with pytest.raises(ValueError):
        json.loads(reply.choices[0].message.content)


def test_greedy_answers_without_a_format_are_the_engines_own(api, engines):
    messages = [{"role": "user", "content": "What does the tar command do?"}]
    done = engines["pico"].complete(messages=messages, params=None)
    reply = api.openai().chat.completions.create(model="pico", messages=messages, temperature=0,
                                                 max_tokens=len(done.token_ids) or 1)
    assert reply.choices[0].message.content == done.text


# -- tools ------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["qwen3", "qwen3-llama"])
def test_required_and_named_tool_choice_give_20_of_20_valid_calls(api, model):
    client = api.openai(timeout=60)
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for i in range(20):
        choice = "required" if i % 2 else {"type": "function", "function": {"name": TOOLS[i // 2 % 2]["function"]["name"]}}
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"{PROMPTS[i % 5]} ({i})"}], tools=TOOLS,
            tool_choice=choice, max_tokens=80, temperature=0.8, seed=i)
        choice_out = reply.choices[0]
        assert choice_out.finish_reason == "tool_calls", choice_out
        (call,) = choice_out.message.tool_calls
        if isinstance(choice, dict):
            assert call.function.name == choice["function"]["name"]
        jsonschema.validate(json.loads(call.function.arguments), params[call.function.name])
        assert call.id.startswith("call_") and call.type == "function"


def test_a_streamed_call_arrives_as_a_tool_calls_delta_then_finish_tool_calls(api):
    chunks = list(api.openai().chat.completions.create(
        model="qwen3", messages=[{"role": "user", "content": "weather?"}], tools=TOOLS, tool_choice="required",
        max_tokens=80, stream=True))
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].index == 0 and deltas[0].function.name in ("get_weather", "add")
    json.loads(deltas[0].function.arguments)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""  # the call is not content
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_call_its_result_and_the_answer_round_trip_through_the_template(api, engines):
    client = api.openai()
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model="qwen3", messages=ask, tools=TOOLS, max_tokens=80,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    turn = ask + [first.choices[0].message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}]
    second = client.chat.completions.create(model="qwen3", messages=turn, tools=TOOLS, tool_choice="none",
                                            max_tokens=8)
    assert second.choices[0].message.content and not second.choices[0].message.tool_calls
    # what the model read: the call as the template writes it, then the result
    sent = protocol.Generate(id="x", model="qwen3", messages=[
        *ask, {"role": "assistant", "content": "", "tool_calls": [
            {"id": call.id, "name": "get_weather", "arguments": json.loads(call.function.arguments)}]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}], tools=TOOLS)
    ids = engines["qwen3"].encode(messages=template_messages([dict(m) for m in sent.messages]), tools=TOOLS)
    prompt = engines["qwen3"].tokenizer.decode(ids)
    assert f'<tool_call>\n{{"name": "get_weather", "arguments": {call.function.arguments}}}\n</tool_call>' in prompt
    assert "<tool_response>\n18 C and sunny\n</tool_response>" in prompt
    assert second.usage.prompt_tokens == len(ids)


def test_ollama_tools_return_calls_with_object_arguments(api):
    reply = api.ollama().chat(model="qwen3-llama", messages=[{"role": "user", "content": "add 2 and 3"}],
                              tools=TOOLS, options={"num_predict": 80})
    # auto: a random model may or may not begin a call; when it does, the grammar holds it to the schema
    for call in reply.message.tool_calls or []:
        params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[call.function.name]
        jsonschema.validate(dict(call.function.arguments), params)


def test_ollama_show_lists_tools_for_a_template_with_tool_support(api, folders):
    for name in ("pico", "qwen3"):  # the registry's folders hold what /api/show reads
        shutil.copy(folders[name] / "chat_template.jinja", api.registry.get(name).path)
    assert api.ollama().show("qwen3").capabilities == ["completion", "tools"]
    assert api.ollama().show("pico").capabilities == ["completion"]


def test_the_tool_syntax_is_read_from_the_template_text():
    assert form_of(tool_templates.HERMES) == HERMES and form_of(tool_templates.LLAMA3) == LLAMA3
    assert form_of((DEMO_MODEL / "chat_template.jinja").read_text()) is None
    use = ToolUse(HERMES, TOOLS, "auto")
    text, calls = use.parse('Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')
    assert text == "Sure." and [(c["name"], c["arguments"]) for c in calls] == [("add", {"a": 1, "b": 2})]
    assert use.parse('<tool_call>\n{"name": "add", "argu')[1] == []  # cut short: no call claimed
    llama = ToolUse(LLAMA3, TOOLS, "auto")
    assert llama.parse('{"name": "add", "parameters": {"a": 1, "b": 2}}')[1][0]["arguments"] == {"a": 1, "b": 2}
    assert llama.parse("It is sunny.") == ("It is sunny.", [])
    assert use.held("Let me look. <tool") == len("Let me look. ") and use.held("plain text") == len("plain text")


# -- what is refused ------------------------------------------------------------------------

REFUSED = [
    ({"model": "pico", "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {
        "type": "object", "if": {"required": ["a"]}, "then": {}}}}}, 400, "if"),
    ({"model": "pico", "tools": TOOLS}, 400, "no tool support"),
    ({"model": "qwen3", "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}}, 400,
     "'fly', which is not in tools"),
    ({"model": "qwen3", "tools": TOOLS, "response_format": {"type": "json_object"}}, 400,
     "format together with tools"),
    ({"model": "qwen3", "tools": [{"type": "function", "function": {"name": "a b"}}]}, 400, "function.name"),
    ({"model": "qwen3", "tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"not": {"type": "string"}}}}}}]}, 400, "not"),
]


@pytest.mark.parametrize("body, status, needle", REFUSED, ids=[r[2] for r in REFUSED])
def test_what_structured_output_cannot_do_is_a_400_naming_it(api, body, status, needle):
    r = api.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], **body})
    assert r.status_code == status and needle in r.json()["error"]["message"], r.text
    olla = api.http.post("/api/chat", json={"model": "pico", "messages": [{"role": "user", "content": "hi"}],
                                            "format": {"type": "object", "patternProperties": {"^a": {}},
                                                       "if": {}}})
    assert olla.status_code == 400 and "if" in olla.json()["error"]


def test_the_protocol_carries_format_tools_and_tool_messages():
    req = protocol.Generate(id="1", model="m", messages=[
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "add", "arguments": {"a": 1}}]},
        {"role": "tool", "content": "3", "tool_call_id": "c1"}], tools=TOOLS, tool_choice={"name": "add"})
    back = protocol.decode_request(protocol.encode_request(req))
    assert back == req and back.structure["tool_choice"] == {"name": "add"}
    assert protocol.decode_request(protocol.encode_request(
        protocol.Generate(id="2", model="m", prompt="x", format=SCHEMAS[0]))).format == SCHEMAS[0]
    for bad in ({"format": 7}, {"tool_choice": "auto"}, {"tools": [{"type": "function", "function": {}}]}):
        with pytest.raises(AnemllError):
            protocol.Generate(id="3", model="m", messages=[{"role": "user", "content": "hi"}], **bad)
    with pytest.raises(AnemllError, match="belongs to a message with role 'assistant'"):
        protocol.Generate(id="4", model="m", messages=[{"role": "user", "content": "hi", "tool_calls": []}])


# -- the guide and the tool stream, without a model -------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(DEMO_MODEL), local_files_only=True)
    tok.chat_template = tool_templates.HERMES
    return tok


def drive(guide, tokenizer, prefer: str, budget: int) -> tuple[str, bool]:
    """Run ``guide`` on logits that always favour the tokens of ``prefer``'s
    characters (a model stuck on them); the text and whether it finished."""
    favoured = {t for t in range(len(tokenizer)) if tokenizer.decode([t]) and set(tokenizer.decode([t])) <= set(prefer)}
    base = np.full(len(tokenizer), -5.0, dtype=np.float32)
    base[list(favoured)] = 5.0
    out = []
    for _ in range(budget):
        token = int(np.argmax(guide.mask(base + np.linspace(0, 1, len(tokenizer), dtype=np.float32))))
        out.append(token)
        guide.accept(token)
        if guide.finished:
            return tokenizer.decode(out), True
    return tokenizer.decode(out), False


def test_a_model_stuck_on_digits_is_steered_to_close_the_json_within_its_budget(tokenizer):
    from anemlld.runtime.grammar import Guide, json_grammar

    schema = SCHEMAS[3]  # a number with bounds, whose digits never end by themselves
    text, finished = drive(Guide(tokenizer, {4, 1}, json_grammar(schema), budget=40), tokenizer, "0123456789", 40)
    assert finished and len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= 40
    jsonschema.validate(json.loads(text), schema)
    unsteered, finished = drive(Guide(tokenizer, {4, 1}, json_grammar(schema)), tokenizer, "0123456789", 40)
    assert not finished  # without the budget the same model never stops writing digits


def test_auto_constrains_a_call_once_the_answer_begins_one_and_leaves_text_alone(tokenizer):
    from anemlld.runtime.tools import Begun

    use = ToolUse(HERMES, TOOLS, "auto")
    begun = Begun(tokenizer, {4, 1}, use, budget=80)
    for t in tokenizer("<tool_call>\n{\"name\": \"add\"", add_special_tokens=False)["input_ids"]:
        begun.accept(t)
    assert begun.inner is not None
    allowed = np.isfinite(begun.mask(np.zeros(len(tokenizer), dtype=np.float32)))
    word = tokenizer("hello", add_special_tokens=False)["input_ids"][0]
    comma = tokenizer(",", add_special_tokens=False)["input_ids"][0]
    assert allowed[comma] and not allowed[word]  # in a call's JSON: no free words
    text = Begun(tokenizer, {4, 1}, use, budget=80)
    for t in tokenizer("Hello there", add_special_tokens=False)["input_ids"]:
        text.accept(t)
    assert text.free and text.inner is None and not text.finished


def test_the_tool_stream_holds_the_call_back_and_done_carries_it():
    from anemlld.runtime.engine import Done, Stats, Token

    use = ToolUse(HERMES, TOOLS, "auto")
    pieces = ["Let me check.", " <tool", "_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}",
              "\n</tool_call>"]
    events = [Token(p, [i]) for i, p in enumerate(pieces)] + [Done("".join(pieces), [0, 1, 2, 3],
                                                                   Stats(done_reason="stop"))]
    out = list(use.stream(iter(events)))
    assert "".join(e.text for e in out[:-1]) == "Let me check. "
    assert out[-1].tool_calls[0]["arguments"] == {"a": 1, "b": 2} and out[-1].stats.done_reason == "tool_calls"
    cut = list(use.stream(iter(events[:2] + [Done("".join(pieces[:2]), [0, 1], Stats(done_reason="length"))])))
    assert "".join(e.text for e in cut[:-1]) == "Let me check. <tool" and cut[-1].tool_calls is None


def test_the_closing_tokens_found_from_token_names_are_exactly_those_found_from_bytes(tokenizer):
    import llguidance.hf

    from anemlld.runtime import grammar

    view = llguidance.hf.from_tokenizer(tokenizer)
    texts = [view.decode_bytes([i]) for i in range(view.vocab_size)]
    exact = [[np.array([bool(rx.fullmatch(t)) for t in texts]) for rx in where] for where in grammar.CLOSING]
    fast = grammar._closers(tokenizer, view)
    assert all((f == e).all() for fs, es in zip(fast, exact) for f, e in zip(fs, es))
    assert all(f.any() for fs in fast for f in fs)
