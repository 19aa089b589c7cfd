"""The HTTP APIs of a real daemon serving the trained demo model (converted
once for this module): the real `openai` (sync and async) and `ollama`
clients get the socket's greedy text, streamed equals whole, the second turn
of a stateless chat comes from the prefix cache, keep_alive 0 unloads, and
the listings agree with the socket's."""
from __future__ import annotations

import asyncio
import time

import httpx
import ollama
import openai
import pytest

from anemlld.convert import pipeline
from shared import protocol
from shared.options import ConvertOptions
from tests.conftest import DEMO_MODEL
from tests.daemon_harness import Client, DaemonProcess, wait_for_state

QUESTION = [{"role": "user", "content": "What does the tar command do?"}]
MAX = 24


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    home = tmp_path_factory.mktemp("http") / "home"
    d = DaemonProcess(home).start()
    opts = ConvertOptions.from_mapping({"context_length": 256, "batch_size": 32, "lut_ffn": "none",
                                        "lut_lm_head": "none"})
    pipeline.convert(DEMO_MODEL, d.settings.drop_dir / "pico", opts)  # converted: served as it is
    with Client(d.settings) as c:
        wait_for_state(c, "pico", ("ready",), timeout=60)
    d.url = d.http_url
    yield d
    assert d.stop() == 0


def socket_answer(d: DaemonProcess, messages, max_tokens: int = MAX) -> tuple[str, dict]:
    with Client(d.settings) as c:
        events = c.stream(protocol.Generate, model="pico", messages=messages, temperature=0.0,
                          max_tokens=max_tokens)
    assert events[-1].event == "done", events[-1]
    return "".join(e["text"] for e in events if e.event == "token"), events[-1].data


def test_hello_names_the_http_address(served):
    assert served.url.startswith("http://127.0.0.1:") and int(served.url.rsplit(":", 1)[1]) > 0
    assert httpx.get(served.url + "/health").json()["status"] == "ok"


def test_every_client_gets_the_sockets_greedy_text(served):
    text, done = socket_answer(served, QUESTION)
    assert text.strip()
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0)
    whole = client.chat.completions.create(model="pico", messages=QUESTION, temperature=0, max_tokens=MAX)
    assert whole.choices[0].message.content == text
    assert whole.usage.prompt_tokens == done["prompt_tokens"]
    assert whole.usage.completion_tokens == done["completion_tokens"]
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="pico", messages=QUESTION, temperature=0, max_tokens=MAX, stream=True))
    assert streamed == text

    async def async_text() -> str:
        async with openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0) as c:
            stream = await c.chat.completions.create(model="pico", messages=QUESTION, temperature=0,
                                                     max_tokens=MAX, stream=True)
            return "".join([ch.choices[0].delta.content or "" async for ch in stream])
    assert asyncio.run(async_text()) == text

    olla = ollama.Client(host=served.url)
    reply = olla.chat(model="pico", messages=QUESTION, options={"temperature": 0, "num_predict": MAX})
    assert reply.message.content == text and reply.prompt_eval_count == done["prompt_tokens"]


def test_max_tokens_ends_with_length(served):
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0)
    reply = client.chat.completions.create(model="pico", messages=QUESTION, temperature=0, max_tokens=2)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 2


def test_the_second_turn_of_a_stateless_chat_prefills_only_what_is_new(served):
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0)
    first = client.chat.completions.create(model="pico", messages=QUESTION, temperature=0, max_tokens=MAX)
    turn2 = QUESTION + [{"role": "assistant", "content": first.choices[0].message.content},
                        {"role": "user", "content": "And ls?"}]
    second = client.chat.completions.create(model="pico", messages=turn2, temperature=0, max_tokens=MAX)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens, (cached, first.usage)
    # the cache never changes an answer: the socket with the same messages says the same
    assert second.choices[0].message.content == socket_answer(served, turn2)[0]


def test_listings_and_keep_alive_0(served):
    olla = ollama.Client(host=served.url)
    assert [m.model for m in olla.list().models] == ["pico:latest"]
    olla.generate(model="pico", prompt="hi", options={"num_predict": 1})
    ps = olla.ps().models
    assert [m.model for m in ps] == ["pico:latest"] and ps[0].context_length == 256
    show = olla.show("pico")
    assert show.modelinfo["llama.context_length"] == 256 and show.capabilities == ["completion"]
    olla.generate(model="pico", prompt="", keep_alive=0)
    deadline = time.monotonic() + 10
    while olla.ps().models and time.monotonic() < deadline:
        time.sleep(0.1)
    assert olla.ps().models == []
    with Client(served.settings) as c:
        assert c.request(protocol.Ps).data["ps"] == []


def test_eight_clients_at_once_each_get_the_answer_they_get_alone(served):
    from concurrent.futures import ThreadPoolExecutor

    questions = [[{"role": "user", "content": q}] for q in (
        "What does ls do?", "What does cp do?", "What does mv do?", "What does rm do?", "What does cat do?",
        "What does grep do?", "What does pwd do?", "What does mkdir do?")]
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0)

    def ask(messages) -> str:
        reply = client.chat.completions.create(model="pico", messages=messages, temperature=0, max_tokens=16)
        return reply.choices[0].message.content

    alone = [ask(m) for m in questions]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, questions))
    assert together == alone and len(set(alone)) > 1
