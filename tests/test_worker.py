"""Model workers: each loaded model runs in a process of its own (anemlld/worker.py).
Proved with real worker processes on a tiny converted Llama (it rarely ends an
answer by itself, which makes a long answer to kill or cancel): the answer is
the in-process engine's, cancel reaches the worker, `ps` shows its pid and
measured memory, unload ends it, a kill -9 mid-answer costs that answer only
(over the service, the socket and HTTP), a worker that dies on every load
leaves the model failed after 3 tries, and a daemon killed with -9 leaves no
worker behind."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import threading
import time

import httpx
import psutil
import pytest

from anemlld.convert import pipeline
from anemlld.registry import Registry
from anemlld.residency import Residency
from anemlld.runtime.engine import Engine
from anemlld.runtime.sampling import SamplingParams
from anemlld.service import Service
from anemlld.worker import CRASH_HOOK
from shared import protocol
from shared.errors import AnemllError
from shared.options import ConvertOptions
from shared.settings import Settings
from tests.daemon_harness import Client, DaemonProcess, wait_for_state
from tests.test_residency import wait_for

PROMPT = "What does tar do?"
STOPPED = "model 'tiny' stopped (killed by signal 9) and will be reloaded on the next request"
LONG = 100_000  # the tiny model does not stop by itself: an answer this long is still running when killed


@pytest.fixture(scope="module")
def converted(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("worker") / "tiny-ane"
    opts = ConvertOptions.from_mapping({"context_length": 128, "batch_size": 32, "lut_ffn": "none",
                                        "lut_lm_head": "none"})
    pipeline.convert(tiny_models["llama"], out, opts)
    return out


@pytest.fixture(scope="module")
def greedy(converted) -> list[int]:
    """The in-process engine's greedy answer: what every worker must say."""
    engine = Engine(converted, executor="portable")
    return engine.complete(prompt=PROMPT, params=SamplingParams(max_tokens=12, temperature=0.0)).token_ids


@pytest.fixture(scope="module")
def service(converted, tmp_path_factory):
    """One residency for the module's tests, so they share worker loads (seconds each)."""
    home = tmp_path_factory.mktemp("worker-service") / "home"
    settings = dataclasses.replace(Settings.load(home=home), memory_budget=0)
    registry = Registry()
    registry.upsert("tiny", state="ready", path=str(converted), size_bytes=1 << 20)
    residency = Residency(settings, registry)  # no loader: the daemon's, a worker process per model
    yield Service(settings, registry, residency)
    residency.stop()


class Recorder:
    """A generation's events (the service's Sink); ``on_token`` runs on the model's thread."""

    def __init__(self, on_token=None):
        self.tokens: list[int] = []
        self.text = ""
        self.finished = threading.Event()
        self.fields: dict | None = None
        self.failure = None
        self.on_token = on_token

    def progress(self, part, fraction):
        pass

    def token(self, text, token_ids):
        self.tokens.extend(token_ids)
        self.text += text
        if self.on_token is not None:
            self.on_token(self)

    def done(self, fields):
        self.fields = fields
        self.finished.set()

    def error(self, error):
        self.failure = error
        self.finished.set()


def ask(service: Service, max_tokens: int = 12, on_token=None, model: str = "tiny") -> Recorder:
    rec = Recorder(on_token)
    service.generate(protocol.Generate(id="t", model=model, prompt=PROMPT, max_tokens=max_tokens,
                                       temperature=0.0), rec)
    return rec


def finished(rec: Recorder, timeout: float = 30.0) -> Recorder:
    assert rec.finished.wait(timeout), "the generation did not end"
    return rec


def worker_pid(service: Service) -> int:
    [record] = service.ps()
    return record["pid"]


def test_a_model_runs_in_its_own_process_and_answers_as_the_in_process_engine(service, greedy):
    rec = finished(ask(service))
    assert rec.failure is None and rec.tokens == greedy and rec.fields["completion_tokens"] == 12
    [record] = service.ps()
    assert record["pid"] != os.getpid() and psutil.Process(record["pid"]).ppid() == os.getpid()
    assert record["memory_bytes"] > 50 << 20  # torch and the model: measured, not the 1 MB on disk
    assert record["context_length"] == 128 and record["requests"] == 1


def test_cancel_reaches_the_worker_between_tokens(service):
    generation = None

    def cancel_at_first(rec):
        generation.cancel()
    rec = Recorder(on_token=cancel_at_first)
    generation = service.generate(protocol.Generate(id="t", model="tiny", prompt=PROMPT, max_tokens=LONG,
                                                    temperature=0.0), rec)
    finished(rec)
    assert rec.fields["done_reason"] == "cancelled" and rec.fields["completion_tokens"] < 1000
    assert finished(ask(service, 3)).fields["completion_tokens"] == 3  # the worker serves on


def test_kill_9_mid_answer_ends_that_answer_and_the_queued_one_reloads_the_model(service, greedy):
    finished(ask(service, 1))
    pid = worker_pid(service)

    t0 = time.monotonic()
    doomed = ask(service, LONG, on_token=lambda rec: os.kill(pid, signal.SIGKILL) if rec.tokens else None)
    queued = ask(service)
    finished(doomed)
    assert time.monotonic() - t0 < 10
    assert doomed.fields is None and doomed.failure.code == "model_failed" and doomed.failure.message == STOPPED
    finished(queued)
    assert queued.failure is None and queued.tokens == greedy
    assert worker_pid(service) != pid
    assert service.registry.get("tiny").state == "loaded"


def test_a_worker_that_dies_while_idle_is_let_go_and_the_next_request_loads_it(service, greedy):
    finished(ask(service, 1))
    pid = worker_pid(service)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: service.ps() == [], timeout=5, what="the dead worker's model to go")
    assert service.registry.get("tiny").state == "ready"
    assert finished(ask(service)).tokens == greedy


def test_unload_ends_the_worker_process(service):
    finished(ask(service, 1))
    pid = worker_pid(service)
    service.unload("tiny")
    wait_for(lambda: not psutil.pid_exists(pid), timeout=5, what="the worker to exit")
    assert service.ps() == [] and service.registry.get("tiny").state == "ready"


def test_a_worker_that_dies_on_every_load_leaves_the_model_failed_after_3_tries(service, monkeypatch):
    # a model of its own: the deaths the other tests caused count for tiny
    service.registry.upsert("crashy", state="ready", path=service.registry.get("tiny").path, size_bytes=1 << 20)
    monkeypatch.setenv(CRASH_HOOK, "load")  # inherited by the workers residency spawns
    failures = [finished(ask(service, model="crashy")).failure for _ in range(3)]
    assert [f.code for f in failures] == ["model_failed"] * 3
    assert [f.message for f in failures[:2]] == [STOPPED.replace("tiny", "crashy")] * 2
    reason = "its worker stopped 3 times in 10 minutes, the last time killed by signal 9"
    assert failures[2].message == f"model 'crashy' failed: {reason}"
    entry = service.registry.get("crashy")
    assert entry.state == "failed" and entry.error["message"] == reason and entry.error["stage"] == "worker"
    with pytest.raises(AnemllError) as refused:  # refused at once, no worker started
        ask(service, model="crashy")
    assert refused.value.code == "model_failed" and reason in refused.value.message
    monkeypatch.delenv(CRASH_HOOK)
    service.load("crashy")  # `load` tries again
    entry = service.registry.get("crashy")
    assert entry.state == "loaded" and entry.error is None
    service.unload("crashy")


def test_schemas_and_tool_calls_are_guided_in_the_worker_and_a_bad_schema_is_bad_request(converted, tmp_path):
    import jsonschema

    from tests import tool_templates
    from tests.test_structured import SCHEMAS, TOOLS

    tools_model = tool_templates.use_template(shutil.copytree(converted, tmp_path / "tools"), tool_templates.HERMES)
    settings = dataclasses.replace(Settings.load(home=tmp_path / "home"), memory_budget=0)
    registry = Registry()
    registry.upsert("tiny", state="ready", path=str(converted), size_bytes=1 << 20)
    registry.upsert("tools", state="ready", path=str(tools_model), size_bytes=1 << 20)
    residency = Residency(settings, registry)
    service = Service(settings, registry, residency)
    hi = [{"role": "user", "content": "hi"}]
    try:
        for schema in SCHEMAS[:4]:
            rec = Recorder()
            service.generate(protocol.Generate(id="s", model="tiny", messages=hi, max_tokens=80, format=schema), rec)
            jsonschema.validate(json.loads(finished(rec).text), schema)
        rec = Recorder()
        service.generate(protocol.Generate(id="t", model="tools", messages=hi, max_tokens=80, tools=TOOLS,
                                           tool_choice="required"), rec)
        (call,) = finished(rec).fields["tool_calls"]
        assert rec.fields["done_reason"] == "tool_calls" and rec.text == ""
        jsonschema.validate(call["arguments"], {t["function"]["name"]: t["function"]["parameters"]
                                                for t in TOOLS}[call["name"]])
        rec = Recorder()
        service.generate(protocol.Generate(id="b", model="tiny", messages=hi, format={"if": {}}), rec)
        assert finished(rec).failure.code == "bad_request" and '"if"' in finished(rec).failure.message
        assert {r["name"] for r in service.ps()} == {"tiny", "tools"}  # one worker each: no compile waits on another
    finally:
        residency.stop()


def test_stopping_residency_ends_every_worker(service):
    service.load("tiny")
    service.load("crashy")
    pids = [record["pid"] for record in service.ps()]
    assert len(set(pids)) == 2
    t0 = time.monotonic()
    service.residency.stop()
    assert not [pid for pid in pids if psutil.pid_exists(pid)] and time.monotonic() - t0 < 5


# -- a real daemon --------------------------------------------------------------------

@pytest.fixture(scope="module")
def daemon(converted, tmp_path_factory):
    import shutil

    home = tmp_path_factory.mktemp("worker-daemon") / "home"
    d = DaemonProcess(home).start()
    for name in ("tiny", "other"):
        shutil.copytree(converted, d.settings.drop_dir / name)  # converted: served as it is
    with Client(d.settings) as c:
        for name in ("tiny", "other"):
            wait_for_state(c, name, ("ready",), timeout=60)
    yield d
    d.stop()


def daemon_ps(d: DaemonProcess) -> dict[str, dict]:
    with Client(d.settings) as c:
        return {m["name"]: m for m in c.request(protocol.Ps).data["ps"]}


def test_kill_9_of_a_worker_mid_answer_over_http_and_the_socket_costs_that_answer_only(daemon, greedy):
    with Client(daemon.settings) as c:
        c.request(protocol.Load, model="tiny")
    pid = daemon_ps(daemon)["tiny"]["pid"]
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": LONG, "temperature": 0, "stream": True}
    with httpx.Client(base_url=daemon.http_url, timeout=30) as http, \
            http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                break
        os.kill(pid, signal.SIGKILL)
        errors = [json.loads(line[6:])["error"] for line in lines
                  if line.startswith("data: {") and "error" in json.loads(line[6:])]
    assert errors and errors[0]["code"] == "model_failed" and errors[0]["message"].startswith(STOPPED)

    with Client(daemon.settings) as c:
        rid = c.send(protocol.Generate, model="tiny", prompt=PROMPT, max_tokens=LONG, temperature=0.0)
        while (first := c.recv()).event == "progress":  # the HTTP kill left it to load again
            pass
        assert first.id == rid and first.event == "token"
        os.kill(daemon_ps(daemon)["tiny"]["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        while (ev := c.recv(10)).event == "token":
            pass
        assert time.monotonic() - t0 < 10
        assert ev.event == "error" and ev["code"] == "model_failed" and ev["message"] == STOPPED
        assert c.request(protocol.Hello).event == "hello"
        again = c.stream(protocol.Generate, model="tiny", prompt=PROMPT, max_tokens=12, temperature=0.0)
        assert [i for e in again if e.event == "token" for i in e["token_ids"]] == greedy


def test_kill_9_of_the_daemon_alone_leaves_no_worker_10_s_later(daemon):
    with Client(daemon.settings) as c:
        for name in ("tiny", "other"):  # tiny is loaded already, unless this test runs alone
            assert c.request(protocol.Load, model=name).event == "ok"
    pids = [record["pid"] for record in daemon_ps(daemon).values()]
    assert len(set(pids)) == 2 and all(psutil.pid_exists(pid) for pid in pids)
    daemon.kill9()  # the daemon only, not its process group
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_running(pid) for pid in pids):
        time.sleep(0.1)
    assert not [pid for pid in pids if _running(pid)]


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_retry_of_a_model_whose_worker_kept_dying_makes_it_servable_without_converting(tmp_path):
    from anemlld.residency import Residency
    from anemlld.service import Service
    from tests.test_residency import FakeLoader, make_registry, make_settings

    registry = make_registry(tmp_path, {"pico": 10})
    error = {"code": "model_failed", "stage": "worker", "message": "its worker stopped 3 times in 10 minutes",
             "hint": "load it to try again"}
    registry.upsert("pico", state="failed", error=error)
    residency = Residency(make_settings(tmp_path, memory_budget=0), registry, FakeLoader())
    try:
        service = Service(residency.settings, registry, residency, jobs=None)  # no jobs: nothing to convert
        assert service.retry("pico") == {"job": None, "name": "pico"}
        assert registry.get("pico").state == "ready" and registry.get("pico").error is None
        with pytest.raises(AnemllError, match="does not run conversion jobs"):
            service.retry("pico")  # no longer failed by its worker: a retry would mean converting
    finally:
        residency.stop()
