"""The HTTP APIs in-process on the fake engine, over a real socket: the real
`openai` (sync and async) and `ollama` clients get the fake engine's text,
raw requests see the exact SSE and NDJSON shapes, every bad request gets its
status and a message naming the problem, the guards refuse foreign hosts,
origins and keys, and clients that leave free the model at once. A real
daemon on a converted model is in test_http_daemon.py."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import ollama
import openai
import pytest

from anemlld.http import bridge
from anemlld.http.server import HttpServer
from anemlld.residency import Residency
from anemlld.service import Service
from shared.settings import HttpSettings
from tests.test_residency import FakeEngine, FakeLoader, make_registry, make_settings, wait_for


class Api:
    def __init__(self, tmp_path, http: HttpSettings, loader, jobs=None, models=None, **changes):
        changes.setdefault("memory_budget", 0)
        self.settings = make_settings(tmp_path, **changes)
        self.registry = make_registry(tmp_path, models or {"pico": 10, "nano": 20})
        self.loader = loader
        self.residency = Residency(self.settings, self.registry, loader)
        self.service = Service(self.settings, self.registry, self.residency, jobs)
        self.server = HttpServer(self.service, http)
        self.url = self.server.bind()
        self.server.start()
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def openai(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)

    def ollama(self, **kw) -> ollama.Client:
        return ollama.Client(host=self.url, **kw)

    def close(self) -> None:
        self.http.close()
        self.server.stop()
        self.residency.stop()


@pytest.fixture
def api(tmp_path):
    made: list[Api] = []

    def build(http: HttpSettings | None = None, loader=None, **kw) -> Api:
        a = Api(tmp_path, http or HttpSettings(port=0), loader or FakeLoader(), **kw)
        made.append(a)
        return a

    yield build
    for a in made:
        a.close()


def expected(model: str, text: str, n: int) -> str:
    return "".join(f"{model}:{text}:{i} " for i in range(n))


def sse(body: str) -> list[str]:
    """The data lines of an event stream, in order (comments dropped)."""
    return [line[len("data: "):] for line in body.split("\n\n") if line.startswith("data: ")]


# -- the real clients ---------------------------------------------------------------

def test_openai_client_chat_gets_the_engines_text_usage_and_finish_reason(api):
    a = api()
    client = a.openai()
    reply = client.chat.completions.create(model="pico", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=3)
    assert reply.choices[0].message.content == expected("pico", "hi", 3)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "length"
    assert reply.object == "chat.completion" and reply.model == "pico"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (1, 3, 4)
    assert reply.usage.prompt_tokens_details.cached_tokens == 0


def test_openai_streamed_text_equals_the_whole_answer_and_usage_comes_last(api):
    a = api()
    client = a.openai()
    messages = [{"role": "user", "content": "hi"}]
    whole = client.chat.completions.create(model="pico", messages=messages, max_tokens=5)
    chunks = list(client.chat.completions.create(model="pico", messages=messages, max_tokens=5, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5


def test_openai_completions_and_models(api):
    a = api()
    client = a.openai()
    reply = client.completions.create(model="nano", prompt="once", max_tokens=2)
    assert reply.object == "text_completion" and reply.choices[0].text == expected("nano", "once", 2)
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="nano", prompt="once",
                                                                              max_tokens=2, stream=True))
    assert streamed == reply.choices[0].text
    assert sorted(m.id for m in client.models.list()) == ["nano", "pico"]
    assert client.models.retrieve("pico").id == "pico"
    with pytest.raises(openai.NotFoundError, match="no model named 'tiny'"):
        client.models.retrieve("tiny")


def test_async_openai_client_streams_eight_requests_each_with_its_own_text(api):
    a = api(queue_limit=8)

    async def ask(client, i: int) -> str:
        stream = await client.chat.completions.create(model="pico", stream=True, max_tokens=4,
                                                      messages=[{"role": "user", "content": f"q{i}"}])
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=a.url + "/v1", api_key="x", max_retries=0) as client:
            return await asyncio.gather(*(ask(client, i) for i in range(8)))

    assert asyncio.run(main()) == [expected("pico", f"q{i}", 4) for i in range(8)]
    assert a.loader.engines["pico"].max_active == 1  # one at a time on the model, in turn


def test_ollama_client_chat_generate_stream_and_stats(api):
    a = api()
    client = a.ollama()
    reply = client.chat(model="pico", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 3},
                        stream=False)
    assert reply.message.content == expected("pico", "hi", 3) and reply.done and reply.done_reason == "length"
    assert reply.eval_count == 3 and reply.prompt_eval_count == 1 and reply.total_duration > 0
    parts = list(client.chat(model="pico:latest", messages=[{"role": "user", "content": "hi"}],
                             options={"num_predict": 3}, stream=True))
    assert "".join(p.message.content for p in parts) == reply.message.content
    assert parts[-1].done and not any(p.done for p in parts[:-1]) and parts[-1].eval_count == 3
    generated = client.generate(model="nano", prompt="yo", options={"num_predict": 2})
    assert generated.response == expected("nano", "yo", 2)


def test_ollama_tags_ps_show_version_and_keep_alive_0_unloads(api):
    a = api()
    client = a.ollama()
    assert sorted(m.model for m in client.list().models) == ["nano:latest", "pico:latest"]
    assert client.ps().models == []
    loaded = client.chat(model="pico", messages=[])  # an empty chat loads the model
    assert loaded.done_reason == "load" and a.residency.is_loaded("pico")
    assert [m.model for m in client.ps().models] == ["pico:latest"]
    unloaded = client.generate(model="pico", prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload"
    wait_for(lambda: not a.residency.is_loaded("pico"), what="pico unloaded")
    client.generate(model="pico", prompt="yo", options={"num_predict": 1}, keep_alive=0)
    wait_for(lambda: not a.residency.is_loaded("pico"), what="pico unloaded after its request")
    assert a.http.get("/api/version").json()["version"] >= "0.6.4"
    assert a.http.get("/").text == "Ollama is running"
    assert a.http.head("/").status_code == 200
    with pytest.raises(ollama.ResponseError, match="no model named 'tiny'"):
        client.show("tiny")


# -- exact shapes ---------------------------------------------------------------------

def test_sse_chunks_have_openais_exact_shape(api):
    a = api()
    r = a.http.post("/v1/chat/completions", json={"model": "pico", "messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 2, "stream": True,
                                                  "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    data = sse(r.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    first, *content, finish, usage = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == first["id"] for c in chunks)
    assert all(c["choices"][0]["finish_reason"] is None and c["usage"] is None for c in [first, *content])
    assert "".join(c["choices"][0]["delta"]["content"] for c in content) == expected("pico", "hi", 2)
    assert finish["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 3


def test_ndjson_lines_have_ollamas_exact_shape(api):
    a = api()
    r = a.http.post("/api/chat", json={"model": "pico", "messages": [{"role": "user", "content": "hi"}],
                                       "options": {"num_predict": 2}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert all(set(x) == {"model", "created_at", "message", "done"} and x["done"] is False for x in lines[:-1])
    final = lines[-1]
    assert final["done"] is True and final["done_reason"] == "length" and final["message"]["content"] == ""
    for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
                "eval_duration"):
        assert isinstance(final[key], int), key
    assert final["total_duration"] >= final["eval_duration"] > 0
    assert "".join(x["message"]["content"] for x in lines) == expected("pico", "hi", 2)


def test_a_slow_load_gets_keep_alive_comments_before_the_first_chunk(api, monkeypatch):
    monkeypatch.setattr(bridge, "KEEPALIVE_S", 0.1)
    a = api(loader=FakeLoader(delay=0.6))
    r = a.http.post("/v1/chat/completions", json={"model": "pico", "messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 1, "stream": True})
    assert r.text.startswith(": loading ") and "\n\n: keep-alive\n\n" in r.text
    assert sse(r.text)[-1] == "[DONE]"


class LateBoom(FakeLoader):
    """An engine that fails after three tokens, 50 ms apart (the response has started by then)."""

    def __init__(self):
        super().__init__(token_delay=0.05)

    def __call__(self, entry, progress=None):
        engine = super().__call__(entry, progress)
        generate = engine.generate

        def failing(*args, **kw):
            for i, event in enumerate(generate(*args, **kw)):
                if i == 3:
                    raise RuntimeError("the engine broke mid-answer")
                yield event
        engine.generate = failing
        return engine


def test_an_error_after_the_stream_started_is_an_error_event(api):
    a = api(loader=LateBoom())
    r = a.http.post("/v1/chat/completions", json={"model": "pico", "messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 9, "stream": True})
    *_, last = sse(r.text)
    assert "the engine broke mid-answer" in json.loads(last)["error"]["message"]
    with pytest.raises(openai.APIError, match="the engine broke mid-answer"):
        list(a.openai().chat.completions.create(model="pico", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=9, stream=True))
    lines = a.http.post("/api/generate", json={"model": "pico", "prompt": "hi"}).text.splitlines()
    assert "the engine broke mid-answer" in json.loads(lines[-1])["error"]


# -- bad requests -----------------------------------------------------------------------

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
BAD = [
    # (path, body (dict, or bytes sent as they are), status, text the message must contain)
    (CHAT, b"{not json", 400, "not valid JSON"),
    (CHAT, b"[1, 2]", 400, "must be a JSON object"),
    (CHAT, {"model": 7, "messages": HI}, 400, "model must be a model name"),
    (CHAT, {"model": "tiny", "messages": HI}, 404, "no model named 'tiny'"),
    (CHAT, {"model": "pico", "messages": HI, "colour": "red"}, 400, "unknown field 'colour'"),
    (CHAT, {"model": "pico", "messages": HI, "n": 2}, 400, "n = 2 is not supported"),
    (CHAT, {"model": "pico", "messages": HI, "tools": [{"type": "function"}]}, 400, "tools[0] must be"),
    (CHAT, {"model": "pico", "messages": HI, "response_format": {"type": "yaml"}}, 400, "response_format.type"),
    (CHAT, {"model": "pico", "messages": HI, "response_format": {"type": "json_schema", "json_schema": {}}}, 400,
     "response_format.json_schema.schema is missing"),
    (CHAT, {"model": "pico", "messages": HI, "parallel_tool_calls": False}, 400, "parallel_tool_calls = false"),
    (CHAT, {"model": "pico", "messages": HI, "tool_choice": "required"}, 400, "tool_choice needs 'tools'"),
    (CHAT, {"model": "pico", "messages": HI, "logit_bias": {"1": 5}}, 400, "logit_bias is not supported"),
    (CHAT, {"model": "pico", "messages": HI, "logprobs": True}, 400, "logprobs = true is not supported"),
    (CHAT, {"model": "pico", "messages": HI, "max_tokens": -1}, 400, "max_tokens"),
    (CHAT, {"model": "pico", "messages": HI, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    (CHAT, {"model": "pico", "messages": HI, "temperature": "hot"}, 400, "temperature must be a number"),
    (CHAT, {"model": "pico", "messages": HI, "top_p": 1.5}, 400, "top_p"),
    (CHAT, {"model": "pico", "messages": HI, "stop": [""]}, 400, "stop"),
    (CHAT, {"model": "pico", "messages": []}, 400, "messages must be a non-empty list"),
    (CHAT, {"model": "pico", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    (CHAT, {"model": "pico", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "reads text only"),
    (CHAT, {"model": "pico", "messages": [{"role": "function", "content": "42"}]}, 400, "send role 'tool'"),
    (CHAT, {"model": "pico", "messages": HI, "stream": False, "stream_options": {"include_usage": True}}, 400,
     "stream_options is only allowed"),
    ("/v1/completions", {"model": "pico", "prompt": [1, 2, 3]}, 400, "prompt must be a string"),
    ("/api/chat", {"model": "pico", "messages": HI, "format": 5}, 400, "format must be \"json\" or a JSON schema"),
    ("/api/chat", {"model": "pico", "messages": HI, "options": {"mirostat": 2}}, 400, "options.mirostat"),
    ("/api/chat", {"model": "pico", "messages": HI, "options": {"num_predict": "many"}}, 400,
     "options.num_predict must be an integer"),
    ("/api/generate", {"model": "pico", "prompt": "hi", "images": ["aGk="]}, 400, "images is not supported"),
    ("/api/show", {"model": "tiny"}, 404, "no model named 'tiny'"),
    ("/v1/nowhere", {}, 404, "no such endpoint"),
]


@pytest.mark.parametrize("path, body, status, needle", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_each_bad_request_gets_its_status_and_a_message_naming_the_problem(api, path, body, status, needle):
    a = api()
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = a.http.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    message = error if path.startswith("/api") else error["message"]
    assert needle in message
    if not path.startswith("/api"):
        assert set(error) == {"message", "type", "param", "code"}
    assert a.http.get("/health").status_code == 200  # and the server is still there


def test_a_body_over_the_limit_is_413_whether_declared_or_chunked(api):
    a = api(http=HttpSettings(port=0, max_body_bytes=4096))
    big = {"model": "pico", "messages": [{"role": "user", "content": "x" * 10_000}]}
    r = a.http.post(CHAT, json=big)
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]

    def chunks():
        for _ in range(100):
            yield b" " * 1024
    r = a.http.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_num_ctx_past_the_converted_context_says_how_to_reconvert(api, tmp_path):
    a = api()
    folder = tmp_path / "models" / "pico"
    (folder / "meta.yaml").write_text("model_info:\n  architecture: llama\n  parameters:\n    context_length: 64\n"
                                      "    num_chunks: 1\n    embeddings: e\n    lm_head: h\n    ffn: f\n")
    r = a.http.post("/api/chat", json={"model": "pico", "messages": HI, "options": {"num_ctx": 4096}})
    assert r.status_code == 400 and "re-convert it with context_length = 4096" in r.json()["error"]
    show = a.ollama().show("pico")
    assert show.modelinfo["llama.context_length"] == 64 and show.capabilities == ["completion"]


def test_a_full_queue_is_503_with_retry_after(api):
    a = api(queue_limit=0, loader=FakeLoader(token_delay=0.05))
    first = threading.Thread(target=lambda: a.http.post(CHAT, json={"model": "pico", "messages": HI,
                                                                     "max_tokens": 20}))
    first.start()
    wait_for(lambda: "pico" in a.loader.engines and a.loader.engines["pico"].active == 1, what="first running")
    r = a.http.post(CHAT, json={"model": "pico", "messages": HI, "max_tokens": 1})
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1 and "busy" in r.json()["error"]["message"]
    first.join()


class ConvertingJobs:
    def list(self):
        return [{"job": 1, "name": "big", "stage": "quantize", "fraction": 0.42, "state": "running"}]


def test_a_model_still_converting_is_503_with_its_stage_and_fraction(api):
    a = api(jobs=ConvertingJobs())
    a.registry.upsert("big", state="converting")
    r = a.http.post(CHAT, json={"model": "big", "messages": HI})
    assert r.status_code == 503 and r.headers["retry-after"]
    assert "converting (stage quantize, 42%)" in r.json()["error"]["message"]
    r = a.http.post("/api/generate", json={"model": "big", "prompt": "hi"})
    assert r.status_code == 503 and "quantize" in r.json()["error"]


# -- guards ---------------------------------------------------------------------------

def test_a_foreign_host_header_is_403(api):
    a = api()
    r = a.http.get("/v1/models", headers={"host": "evil.example:11435"})
    assert r.status_code == 403 and "DNS rebinding" in r.json()["error"]["message"]
    assert a.http.get("/v1/models", headers={"host": "localhost:11435"}).status_code == 200


def test_foreign_origins_are_refused_and_localhost_ones_get_cors_headers(api):
    a = api(http=HttpSettings(port=0, cors_origins=("http://192.168.1.5:3000",)))
    r = a.http.post(CHAT, json={"model": "pico", "messages": HI}, headers={"origin": "https://evil.example"})
    assert r.status_code == 403 and "cors_origins" in r.json()["error"]["message"]
    for origin in ("http://localhost:8080", "http://192.168.1.5:3000"):
        r = a.http.get("/api/tags", headers={"origin": origin})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
    pre = a.http.options(CHAT, headers={"origin": "http://127.0.0.1:3000", "access-control-request-method": "POST",
                                        "access-control-request-headers": "authorization,content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://127.0.0.1:3000"


def test_with_an_api_key_every_endpoint_but_health_needs_it(api):
    a = api(http=HttpSettings(port=0, api_key="s3cret"))
    assert a.http.get("/health").status_code == 200
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
        r = a.http.get("/v1/models", headers=headers)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert a.http.get("/api/tags").json()["error"].startswith("the API key is missing")
    with pytest.raises(openai.AuthenticationError):
        a.openai(api_key="wrong").models.list()
    assert len(a.openai(api_key="s3cret").models.list().data) == 2
    assert len(a.ollama(headers={"authorization": "Bearer s3cret"}).list().models) == 2


# -- clients that leave -------------------------------------------------------------------

def test_a_stream_dropped_after_two_chunks_frees_the_model_at_once(api):
    a = api(loader=FakeLoader(token_delay=0.05))
    with a.http.stream("POST", CHAT, json={"model": "pico", "messages": HI, "max_tokens": 200,
                                           "stream": True}) as r:
        got = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                got.append(line)
            if len(got) == 2:
                break
    t0 = time.monotonic()
    wait_for(lambda: a.loader.engines["pico"].cancelled.is_set(), timeout=2.0, what="generation cancelled")
    freed = time.monotonic() - t0
    reply = a.http.post(CHAT, json={"model": "pico", "messages": HI, "max_tokens": 1}, timeout=3)
    assert reply.status_code == 200 and freed < 1.0


def test_a_client_that_leaves_a_whole_answer_request_has_it_cancelled(api):
    a = api(loader=FakeLoader(token_delay=0.05))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(a.url + CHAT, json={"model": "pico", "messages": HI, "max_tokens": 200}, timeout=0.5)
    wait_for(lambda: a.loader.engines["pico"].cancelled.is_set(), timeout=2.0, what="generation cancelled")


def test_a_client_that_leaves_while_queued_is_taken_out_of_the_queue(api):
    a = api(loader=FakeLoader(token_delay=0.05))
    first = threading.Thread(target=lambda: a.http.post(CHAT, json={"model": "pico", "messages": HI,
                                                                     "max_tokens": 10}))
    first.start()
    wait_for(lambda: "pico" in a.loader.engines and a.loader.engines["pico"].active == 1, what="first running")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(a.url + CHAT, json={"model": "pico", "messages": [{"role": "user", "content": "late"}],
                                       "max_tokens": 5}, timeout=0.2)
    first.join()
    time.sleep(0.3)
    assert a.residency.ps()[0]["requests"] == 1  # the one that left never ran


def test_a_body_that_never_finishes_arriving_is_408_and_never_reaches_a_model(api, monkeypatch):
    import socket

    monkeypatch.setattr(bridge, "BODY_TIMEOUT_S", 0.3)
    a = api()
    host, port = a.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"model\": \"pico\", ")
        reply = b""
        while b"did not arrive" not in reply and (chunk := s.recv(4096)):
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 408") and "did not arrive within 0.3 s" in reply
    assert a.loader.calls == []


def test_a_client_that_stops_reading_its_stream_has_it_cancelled(api, monkeypatch):
    import socket

    monkeypatch.setattr(bridge, "STALL_S", 0.3)
    a = api(loader=FakeLoader(token_delay=0.0005))
    host, port = a.url.removeprefix("http://").split(":")
    body = json.dumps({"model": "pico", "messages": [{"role": "user", "content": "x" * 200}],
                       "max_tokens": 10_000_000, "stream": True}).encode()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once: the server's writes block
    s.connect((host, int(port)))
    try:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        wait_for(lambda: "pico" in a.loader.engines and a.loader.engines["pico"].cancelled.is_set(), timeout=30,
                 what="the unread stream cancelled")
    finally:
        s.close()
