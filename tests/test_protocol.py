"""The wire contract: every op survives encode -> decode unchanged, every bad
frame gets the documented error code (with the request's id when it has one),
garbage of any shape raises only ProtocolError, and docs/protocol.md names
every op, event and error code the code knows."""
from __future__ import annotations

import dataclasses
import math
import random
import shutil
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from shared import protocol as p
from shared.protocol import ProtocolError

REPO = Path(__file__).resolve().parents[1]
MAX = p.DEFAULT_MAX_FRAME_BYTES


def frame(**fields) -> bytes:
    body = {"v": 1, "id": "r1"}
    body.update(fields)
    return msgpack.packb(body, use_bin_type=True)


def refused(data: bytes, max_bytes: int = MAX) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        p.decode_request(data, max_bytes)
    return info.value


# -- round trips ----------------------------------------------------------------

EXAMPLES = [
    p.Hello(id="a"),
    p.Hello(id="a", client="anemll-chat 0.1.0"),
    p.Models(id="b"), p.Ps(id="c"), p.Jobs(id="d"), p.Watch(id="e"),
    p.Generate(id="f", model="pico", prompt="Once upon"),
    p.Generate(id="g", model="pico", messages=[{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "Hi"}],
               session="s1", max_tokens=64, temperature=0, top_k=40, top_p=0.9, repetition_penalty=1.1,
               seed=p.UINT64_MAX, stop=["\n\n", "User:"], keep_alive="1h30m"),
    p.Generate(id="h", model="pico", prompt="", keep_alive=-1),
    p.Cancel(id="i", target="g"),
    p.Load(id="j", model="pico", keep_alive=0), p.Unload(id="k", model="pico"),
    p.Pin(id="l", model="pico"), p.Pin(id="m", model="pico", pin=False),
    p.Convert(id="n", path="/models/Qwen2.5-0.5B", name="qwen", options={"lut_ffn": "none", "chunks": "2"}),
    p.Retry(id="o", name="qwen"),
]


@pytest.mark.parametrize("request_", EXAMPLES, ids=lambda r: f"{r.op}-{r.id}")
def test_every_op_round_trips_unchanged(request_):
    assert p.decode_request(p.encode_request(request_)) == request_


def test_every_op_has_a_round_trip_example():
    assert {r.op for r in EXAMPLES} == set(p.REQUESTS)


def test_encoded_generate_is_exactly_the_documented_map():
    req = p.Generate(id="7", model="pico", messages=[{"role": "user", "content": "Hi"}], temperature=0,
                     stop=("\n",), keep_alive=-1)
    assert msgpack.unpackb(p.encode_request(req), raw=False) == {
        "v": 1, "id": "7", "op": "generate", "model": "pico",
        "messages": [{"role": "user", "content": "Hi"}], "temperature": 0.0, "stop": ["\n"], "keep_alive": -1}


def test_decoding_normalizes_values():
    req = p.decode_request(frame(op="generate", model="pico", prompt="x", temperature=1, top_p=1,
                                 keep_alive="30m", stop=["a"]))
    assert req.temperature == 1.0 and isinstance(req.temperature, float)
    assert req.keep_alive == 1800.0 and req.stop == ("a",)
    assert p.decode_request(frame(op="load", model="pico", keep_alive=-1)).keep_alive == math.inf
    assert p.decode_request(frame(op="load", model="pico", keep_alive="0")).keep_alive == 0.0
    conv = p.decode_request(frame(op="convert", path="/m", options={"lut_ffn": "none", "chunks": "AUTO"}))
    assert conv.options == {"lut_ffn": None, "chunks": "auto"}


def test_nil_counts_as_absent_for_optional_fields():
    req = p.decode_request(frame(op="generate", model="pico", prompt="x", temperature=None, session=None))
    assert req.temperature is None and req.session is None


def test_requests_are_checked_when_built_in_code_too():
    with pytest.raises(ProtocolError, match="temperature"):
        p.Generate(id="1", model="pico", prompt="x", temperature=-1)


# -- each refusal and its code ------------------------------------------------------

def test_oversized_frame_is_too_large_and_keeps_its_id():
    big = frame(op="generate", model="pico", prompt="x" * 2000)
    err = refused(big, max_bytes=1000)
    assert (err.code, err.request_id) == ("too_large", "r1")
    assert "1000" in err.message and "max_frame_bytes" in err.hint


def test_oversized_frame_finds_its_id_after_a_huge_field():
    big = msgpack.packb({"prompt": "x" * 5000, "v": 1, "op": "generate", "id": "late"})
    assert refused(big, max_bytes=1000).request_id == "late"


@pytest.mark.parametrize("data", [b"\x93\x01\x02" + b"x" * 2000, b"\xc1" * 2000,
                                  msgpack.packb({"id": 5, "p": "x" * 2000})], ids=["array", "garbage", "int-id"])
def test_oversized_frame_without_a_usable_id_is_dropped(data):
    err = refused(data, max_bytes=1000)
    assert (err.code, err.request_id) == ("too_large", None)
    assert err.to_frame() is None


@pytest.mark.parametrize("data,what", [
    (b"", "empty"), (b"\xc1", "reserved byte"), (b"\x81\xa1a", "truncated"), (b"\x80\x80", "two maps"),
    (msgpack.packb([1, 2]), "array"), (msgpack.packb("hello"), "string"), (msgpack.packb(None), "nil"),
    (msgpack.packb({1: "x"}), "int key"), (b"\x81\xa2\xff\xfe\x01", "bad utf-8"),
    (msgpack.packb({"v": 1, "op": "ps"}), "no id"), (frame(id=7, op="ps"), "int id"),
    (frame(id="", op="ps"), "empty id"), (frame(id="x" * 129, op="ps"), "long id"),
    (frame(id=b"r1", op="ps"), "bin id"),
    (msgpack.packb({"id": msgpack.ExtType(1, b"x")}), "ext id"),
])
def test_malformed_frame_without_id_is_bad_request_with_no_one_to_answer(data, what):
    err = refused(data)
    assert (err.code, err.request_id) == ("bad_request", None), what
    assert err.to_frame() is None


@pytest.mark.parametrize("fields,code,words", [
    (dict(v=None, op="ps"), "bad_request", "'v'"),
    (dict(v="1", op="ps"), "bad_request", "'v'"),
    (dict(v=True, op="ps"), "bad_request", "'v'"),
    (dict(v=2, op="ps"), "unsupported_version", "update anemlld"),
    (dict(v=0, op="ps"), "unsupported_version", "update the client"),
    (dict(op=None), "bad_request", "'op'"),
    (dict(op=3), "bad_request", "'op'"),
    (dict(op="generat", model="pico", prompt="x"), "unknown_op", "did you mean 'generate'"),
    (dict(op="ps", verbose=True), "bad_request", "'verbose'"),
    (dict(op="generate", model="pico", prompt="x", temprature=0.5), "bad_request", "did you mean 'temperature'"),
    (dict(op="generate", prompt="x"), "bad_request", "'model'"),
    (dict(op="cancel"), "bad_request", "'target'"),
    (dict(op="convert"), "bad_request", "'path'"),
    (dict(op="ps", **{"\u00e9": 1}), "bad_request", "no field"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_envelope_gets_its_code_and_the_request_id(fields, code, words):
    body = {"v": 1, "id": "r1", **fields}
    if body["v"] is None:
        del body["v"]
    if body.get("op", "") is None:
        del body["op"]
    err = refused(msgpack.packb(body, use_bin_type=True))
    assert (err.code, err.request_id) == (code, "r1")
    assert words in str(err)


def test_bytes_field_names_are_bad_request_with_the_id():
    err = refused(msgpack.packb({"v": 1, "id": "r1", "op": "ps", b"x": 1}, use_bin_type=True))
    assert (err.code, err.request_id) == ("bad_request", "r1")


def test_unsupported_version_reply_tells_the_client_the_daemon_protocol():
    event = p.decode_event(refused(frame(v=9, op="hello")).to_frame())
    assert event.id == "r1" and event["code"] == "unsupported_version" and event["protocol"] == 1
    assert "update anemlld" in event["hint"]


GOOD = dict(op="generate", model="pico", prompt="x")


@pytest.mark.parametrize("field,value", [
    ("model", ""), ("model", "a b"), ("model", 5), ("model", "x" * 65), ("model", "-x"),
    ("prompt", 5), ("prompt", b"bytes"), ("prompt", ["x"]),
    ("session", ""), ("session", "s" * 129), ("session", 1),
    ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", 1.5), ("max_tokens", "10"), ("max_tokens", True),
    ("max_tokens", 1 << 31),
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "0.7"),
    ("temperature", True), ("temperature", [0.7]),
    ("top_k", -1), ("top_k", 2.5), ("top_k", "40"),
    ("top_p", 0), ("top_p", 1.01), ("top_p", -0.5), ("top_p", float("nan")),
    ("repetition_penalty", 0), ("repetition_penalty", -1.0), ("repetition_penalty", "1.1"),
    ("seed", -1), ("seed", 1.0), ("seed", "42"),
    ("stop", "\n"), ("stop", [""]), ("stop", [1]), ("stop", ["x"] * 17), ("stop", ["x" * 257]), ("stop", {"a": 1}),
    ("keep_alive", "soon"), ("keep_alive", -2), ("keep_alive", "-5m"), ("keep_alive", True), ("keep_alive", [1]),
])
def test_generate_field_out_of_type_or_range_is_bad_request_naming_it(field, value):
    err = refused(frame(**{**GOOD, field: value}))
    assert (err.code, err.request_id) == ("bad_request", "r1")
    assert field in err.message


@pytest.mark.parametrize("messages", [
    [], "hi", [{"role": "user"}], [{"role": "robot", "content": "x"}], [{"role": "user", "content": 1}],
    [{"role": "user", "content": "x", "name": "bob"}], [["user", "x"]], [{b"role": "user", b"content": "x"}],
])
def test_malformed_messages_are_bad_request(messages):
    err = refused(frame(op="generate", model="pico", messages=messages))
    assert err.code == "bad_request" and "messages" in err.message


@pytest.mark.parametrize("fields", [dict(op="generate", model="pico"),
                                    dict(op="generate", model="pico", prompt="x",
                                         messages=[{"role": "user", "content": "x"}])])
def test_generate_needs_exactly_one_of_prompt_and_messages(fields):
    err = refused(frame(**fields))
    assert err.code == "bad_request" and "exactly one" in err.message


@pytest.mark.parametrize("fields,words", [
    (dict(op="convert", path="relative/model"), "absolute"),
    (dict(op="convert", path="/m", options={"context_lenght": 512}), "context_length"),
    (dict(op="convert", path="/m", options={"lut_ffn": 5}), "lut_ffn"),
    (dict(op="convert", path="/m", options=[1]), "options"),
    (dict(op="convert", path="/m", name="a/b"), "name"),
    (dict(op="pin", model="pico", pin="yes"), "pin"),
    (dict(op="retry", name=""), "name"),
    (dict(op="cancel", target=7), "target"),
    (dict(op="hello", client=["x"]), "client"),
])
def test_other_ops_check_their_fields(fields, words):
    err = refused(frame(**fields))
    assert err.code == "bad_request" and words in str(err)


# -- garbage of every shape: only ProtocolError, never a crash or "internal" -----------------

WEIRD = [None, True, False, 0, -1, 1, 2 ** 64 - 1, -2 ** 63, 1.5, float("nan"), float("inf"), -0.0,
         "", "x", "x" * 3000, "\u0000", "\ud7ff\U0010ffff", b"", b"\xff" * 10, [], [None], [[[[]]]],
         {}, {"a": {"b": [1, {"c": None}]}}, {"role": "user", "content": "x"}, [{"role": "user", "content": "x"}],
         msgpack.ExtType(5, b"zz"), msgpack.Timestamp(1, 0)]


def decode_survives(data: bytes, max_bytes: int = MAX):
    try:
        result = p.decode_request(data, max_bytes)
    except ProtocolError as e:
        assert e.code != "internal", f"decoder bug on {data[:80]!r}: {e}"
        assert e.code in p.ERROR_CODES
        if e.request_id is not None:
            event = p.decode_event(e.to_frame())
            assert event.event == "error" and event.id == e.request_id
        return e
    assert isinstance(result, p.Request)
    return result


def test_every_field_of_every_op_survives_every_weird_value():
    for op, cls in p.REQUESTS.items():
        base = {f.name: "pico" for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        base.pop("id")
        if "path" in base:
            base["path"] = "/m"
        if op == "generate":
            base["prompt"] = "x"
        assert isinstance(decode_survives(frame(op=op, **base)), p.Request), op
        for f in dataclasses.fields(cls):
            for value in WEIRD:
                out = decode_survives(frame(op=op, **{**base, f.name: value}))
                if isinstance(out, ProtocolError) and f.name != "id":
                    assert out.request_id == "r1"
                    assert out.code == "bad_request" and (f.name in out.message or op == "generate"), (op, f.name, value)


def test_envelope_fields_survive_every_weird_value():
    for key in ("v", "id", "op"):
        for value in WEIRD:
            decode_survives(msgpack.packb({"v": 1, "id": "r1", "op": "ps", key: value}, use_bin_type=True))


def test_random_bytes_raise_only_protocol_error():
    rng = random.Random(1234)
    for _ in range(3000):
        decode_survives(rng.randbytes(rng.randrange(0, 80)))


def test_mutated_valid_frames_raise_only_protocol_error():
    rng = random.Random(99)
    seeds = [p.encode_request(r) for r in EXAMPLES]
    for _ in range(4000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 4)):
            action = rng.randrange(3)
            if action == 0:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif action == 1:
                del data[rng.randrange(len(data)):]
                data = data or bytearray(b"\x80")
            else:
                data.insert(rng.randrange(len(data) + 1), rng.randrange(256))
        decode_survives(bytes(data))


def random_object(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind < 5:
        return rng.choice(WEIRD[:-2] if depth else WEIRD)
    if kind == 5:
        return rng.choice(["generate", "ps", "pico", "r1", "/m", "role", "content", "user"])
    if kind == 6:
        return [random_object(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["v", "id", "op", "model", "prompt", "messages", "stop", "role", "content", "options", 1, b"k"]
    return {rng.choice(keys): random_object(rng, depth + 1) for _ in range(rng.randrange(5))}


def test_random_nested_maps_raise_only_protocol_error():
    rng = random.Random(7)
    for _ in range(3000):
        body = random_object(rng)
        if rng.random() < 0.7:
            body = {"v": 1, "id": "r1", "op": rng.choice(list(p.REQUESTS)),
                    **({} if not isinstance(body, dict) else body)}
        try:
            data = msgpack.packb(body, use_bin_type=True, strict_types=False)
        except (TypeError, ValueError):
            continue
        decode_survives(data)


@pytest.mark.parametrize("data", [
    b"\x91" * 200_000,  # arrays nested deeper than any stack
    b"\xdd\xff\xff\xff\xff",  # an array claiming 4 billion items in 5 bytes
    b"\xdf\xff\xff\xff\xff",  # a map claiming the same
    b"\xdb\xff\xff\xff\xff",  # a string claiming 4 GB
    b"\xc6\xff\xff\xff\xff",  # bin claiming 4 GB
    b"\x81\xa1v\xcf\xff\xff\xff\xff\xff\xff\xff\xff",  # {"v": 2**64-1}
    msgpack.packb({"v": 1, "id": "r1", "op": "generate", "model": "pico", "prompt": "x", "max_tokens": 2 ** 64 - 1}),
    msgpack.packb({"v": 1, "id": "r1", "op": "generate", "model": "pico", "prompt": "x", "seed": -2 ** 63}),
    msgpack.packb({"v": 2 ** 64 - 1, "id": "r1", "op": "ps"}),
    msgpack.packb({"v": 1, "id": "r1", "op": "ps", "x": [[1] * 10] * 1000}),
    msgpack.packb({"v": 1, "id": "r1", "op": "generate", "model": "pico",
                   "messages": [{"role": "user", "content": "x"}] * 20000}),
])
def test_hostile_frames_raise_only_protocol_error(data):
    decode_survives(data)


# -- events -----------------------------------------------------------------------

def test_events_round_trip_through_the_client_decoder():
    token = p.decode_event(p.encode_event("7", "token", text=" hi", token_ids=[312]))
    assert (token.id, token.event, token["text"], token["token_ids"], token.final) == ("7", "token", " hi", [312], False)
    stats = dict.fromkeys(p.GENERATE_STATS, 1)
    done = p.decode_event(p.encode_event("7", "done", done_reason="stop", **stats))
    assert done.final and done["done_reason"] == "stop" and set(p.GENERATE_STATS) <= set(done.data)


def test_event_without_its_required_fields_is_a_daemon_bug():
    with pytest.raises(ValueError, match="token_ids"):
        p.encode_event("1", "token", text="x")
    with pytest.raises(ValueError, match="unknown event"):
        p.encode_event("1", "tokens", text="x", token_ids=[])
    with pytest.raises(ValueError, match="error code"):
        p.encode_error("1", "oops", "message")
    with pytest.raises(ValueError, match="done_reason"):
        p.encode_event("1", "done", done_reason="finished")


def test_error_event_carries_code_message_and_hint_and_raises_on_the_client():
    event = p.decode_event(p.encode_error("9", "busy", "pico has 4 requests waiting", "try again in a moment"))
    assert event.final and (event["code"], event["hint"]) == ("busy", "try again in a moment")
    with pytest.raises(ProtocolError) as info:
        event.raise_for_error()
    assert (info.value.code, info.value.request_id) == ("busy", "9")


def test_client_decoder_passes_unknown_events_through_and_refuses_garbage():
    assert p.decode_event(msgpack.packb({"id": None, "event": "future_thing", "x": 1})).event == "future_thing"
    for data in (b"\xc1", msgpack.packb([1]), msgpack.packb({"id": "1"}), msgpack.packb({"id": 1, "event": "ok"}),
                 msgpack.packb({"event": "ok", 1: 2}, strict_types=False)):
        with pytest.raises(ProtocolError):
            p.decode_event(data)
    with pytest.raises(ProtocolError) as info:
        p.decode_event(b"\x80" * 100, max_bytes=10)
    assert info.value.code == "too_large"


# -- the docs and the light imports ---------------------------------------------------

def test_docs_describe_every_op_event_and_error_code():
    doc = (REPO / "docs" / "protocol.md").read_text()
    for op in p.REQUESTS:
        assert f"### {op}" in doc or f", {op}" in doc, f"op {op} is not documented"
    for name in list(p.EVENTS) + list(p.ERROR_CODES) + list(p.DONE_REASONS) + list(p.GENERATE_STATS):
        assert f"`{name}`" in doc or f'"{name}"' in doc, f"{name} is not documented"
    for cls in p.REQUESTS.values():
        for f in dataclasses.fields(cls):
            assert f'"{f.name}"' in doc or f"`{f.name}`" in doc, f"{cls.op}.{f.name} is not documented"


def test_shared_modules_import_without_heavy_libraries():
    code = ("import sys, shared.protocol, shared.settings, shared.sidecar\n"
            "heavy = [m for m in ('torch', 'coremltools', 'transformers', 'numpy') if m in sys.modules]\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_request_and_its_reply_cross_a_real_ipc_socket_from_a_deep_home(tmp_path):
    import zmq

    from shared.settings import Settings

    settings = Settings.load(home=tmp_path / ("deep-" * 20) / "home", env={})
    settings.make_dirs()
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        for s in (router, dealer):
            s.linger = 0
            s.rcvtimeo = 5000
        router.bind(settings.endpoint)
        dealer.connect(settings.endpoint)
        dealer.send(p.encode_request(p.Generate(id="q1", model="pico", prompt="hi", max_tokens=3)))
        peer, data = router.recv_multipart()
        request = p.decode_request(data, settings.max_frame_bytes)
        assert isinstance(request, p.Generate) and request.max_tokens == 3
        router.send_multipart([peer, p.encode_event(request.id, "token", text="yo", token_ids=[7])])
        event = p.decode_event(dealer.recv())
        assert (event.id, event.event, event["text"]) == ("q1", "token", "yo")
    finally:
        router.close()
        dealer.close()
        ctx.term()
        if not settings.runtime_dir.is_relative_to(tmp_path):  # the short folder in /tmp
            shutil.rmtree(settings.runtime_dir, ignore_errors=True)
