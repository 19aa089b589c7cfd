"""The daemon's socket, through real ZeroMQ sockets: every op answers as
docs/protocol.md says, streams reach only their own client, the queue limit
answers busy, cancel stops a stream, and no frame stops the daemon. One test
serves a real converted tiny model; the rest use the fake engine."""
from __future__ import annotations

import dataclasses
import os
import socket
import stat
import threading
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from anemlld.registry import Registry
from anemlld.residency import Residency
from anemlld.server import Server
from anemlld.service import Service
from shared import protocol as p
from shared.errors import AnemllError
from shared.settings import Settings
from tests.test_residency import FakeLoader, make_registry, make_settings, wait_for

TIMEOUT_MS = 5000


class Client:
    """A DEALER speaking the protocol; keeps events of other ids for later."""

    def __init__(self, ctx: zmq.Context, endpoint: str, **options):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        for name, value in options.items():
            setattr(self.sock, name, value)
        self.sock.connect(endpoint)
        self.pending: dict[str, list[p.Event]] = {}
        self._n = 0

    def send(self, op: str, rid: str | None = None, **fields) -> str:
        self._n += 1
        rid = rid or f"r{self._n}"
        self.sock.send(msgpack.packb({"v": 1, "id": rid, "op": op, **fields}, use_bin_type=True))
        return rid

    def next(self, rid: str, timeout_ms: int = TIMEOUT_MS) -> p.Event:
        while not self.pending.get(rid):
            if not self.sock.poll(timeout_ms):
                raise AssertionError(f"no reply for {rid!r} within {timeout_ms} ms")
            event = p.decode_event(self.sock.recv())
            self.pending.setdefault(event.id, []).append(event)
        return self.pending[rid].pop(0)

    def stream(self, rid: str) -> list[p.Event]:
        events = [self.next(rid)]
        while not events[-1].final:
            events.append(self.next(rid))
        return events

    def ask(self, op: str, **fields) -> p.Event:
        return self.stream(self.send(op, **fields))[-1]

    def silent(self, ms: int = 300) -> bool:
        return not self.sock.poll(ms)


class Daemon:
    def __init__(self, settings: Settings, registry: Registry, loader, jobs=None, stream_interval: float = 0.0):
        self.settings, self.registry, self.loader = settings, registry, loader
        self.residency = Residency(settings, registry, loader)
        self.service = Service(settings, registry, self.residency, jobs)
        self.server = Server(self.service, stream_interval=stream_interval)
        self.server.bind()
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.ctx = zmq.Context()
        self.clients: list[Client] = []

    def client(self, **options) -> Client:
        client = Client(self.ctx, self.settings.endpoint, **options)
        self.clients.append(client)
        return client

    def close(self) -> None:
        for client in self.clients:
            client.sock.close(0)
        self.server.stop()
        self.thread.join(5)
        assert not self.thread.is_alive(), "serve_forever did not return after stop()"
        self.residency.stop()
        self.ctx.term()


@pytest.fixture
def start(tmp_path):
    daemons: list[Daemon] = []

    def build(sizes=None, loader=None, jobs=None, extra=None, stream_interval=0.0, **changes) -> Daemon:
        changes.setdefault("memory_budget", 0)
        settings = make_settings(tmp_path, **changes)
        registry = make_registry(tmp_path, sizes or {"pico": 10, "nano": 20}, **(extra or {}))
        daemon = Daemon(settings, registry, loader or FakeLoader(), jobs, stream_interval)
        daemons.append(daemon)
        return daemon

    yield build
    for daemon in daemons:
        daemon.close()


def tokens(events: list[p.Event]) -> list[str]:
    return [e["text"] for e in events if e.event == "token"]


# -- plain ops -------------------------------------------------------------------------

def test_hello_models_and_ps_answer_with_one_event_named_like_the_op(start):
    d = start()
    c = d.client()
    hello = c.ask("hello", client="test 1")
    assert hello.event == "hello" and hello["protocol"] == 1 and hello["server"] == "anemlld"
    assert hello["capabilities"] == ["hello", "models", "ps", "jobs", "watch", "generate", "cancel",
                                     "load", "unload", "pin",  # no jobs here: no convert, retry
                                     "generate.format", "generate.tools", "generate.tool_choice"]
    assert hello["max_frame_bytes"] == d.settings.max_frame_bytes
    models = c.ask("models")
    assert [(m["name"], m["state"], m["size_bytes"]) for m in models["models"]] == [
        ("nano", "ready", 20), ("pico", "ready", 10)]
    assert c.ask("ps")["ps"] == [] and c.ask("jobs")["jobs"] == []
    assert c.ask("load", model="pico", keep_alive="1h").event == "ok"
    assert [m["state"] for m in c.ask("models")["models"]] == ["ready", "loaded"]
    [ps] = c.ask("ps")["ps"]
    assert ps["name"] == "pico" and ps["size_bytes"] == 10 and not ps["pinned"] and ps["requests"] == 0
    assert ps["expires_at"] == pytest.approx(time.time() + 3600, abs=5) and ps["context_length"] == 64


def test_the_socket_is_owner_only_and_a_second_daemon_is_refused(start):
    d = start()
    path = d.settings.socket_path
    assert stat.S_ISSOCK(path.lstat().st_mode) and stat.S_IMODE(path.lstat().st_mode) == 0o600
    assert stat.S_IMODE(d.settings.runtime_dir.stat().st_mode) == 0o700
    second = Server(Service(d.settings, d.registry, d.residency))
    with pytest.raises(AnemllError, match="already serving"):
        second.bind()
    second.close()
    assert d.settings.socket_path.exists()  # the refused server leaves the live socket alone
    assert d.client().ask("hello").event == "hello"


def test_a_stale_socket_file_is_replaced(tmp_path):
    settings = make_settings(tmp_path, memory_budget=0)
    settings.make_dirs()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(settings.socket_path))
    stale.close()  # the file stays, nobody listens: a daemon that died
    registry = make_registry(tmp_path, {"pico": 1})
    d = Daemon(settings, registry, FakeLoader())
    try:
        assert d.client().ask("hello").event == "hello"
    finally:
        d.close()
    assert not settings.socket_path.exists()  # removed on the way out


# -- generate ----------------------------------------------------------------------------

def test_generate_streams_load_progress_tokens_then_done_with_stats(start):
    d = start()
    c = d.client()
    events = c.stream(c.send("generate", model="pico", prompt="once upon", max_tokens=5, session="s1"))
    kinds = [e.event for e in events]
    assert kinds == ["progress"] * 5 + ["token"] * 5 + ["done"]
    assert [e["fraction"] for e in events[:5]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert events[1]["part"] == "embeddings" and events[0]["kind"] == "load" and events[0]["model"] == "pico"
    assert tokens(events) == [f"pico:once upon:{i} " for i in range(5)]
    assert events[5]["token_ids"] == [0]
    done = events[-1]
    assert done["done_reason"] == "length" and done["completion_tokens"] == 5 and done["prompt_tokens"] == 2
    assert set(p.GENERATE_STATS) <= set(done.data) and done["load_ms"] > 0
    assert {"prefill_tokens", "truncated_tokens", "context_shifts"} <= set(done.data)
    again = c.stream(c.send("generate", model="pico", prompt="once upon", max_tokens=2, session="s1"))
    assert [e.event for e in again] == ["token", "token", "done"]
    assert again[-1]["load_ms"] == 0 and again[-1]["cached_tokens"] == 1  # the session was kept
    assert c.ask("ps")["ps"][0]["requests"] == 2


def test_two_clients_at_once_each_get_only_their_own_tokens(start):
    d = start()
    one, two = d.client(), d.client()
    for c in (one, two):
        c.ask("load", model="pico")
        c.ask("load", model="nano")
    # the same id on both connections: ids are scoped to the client
    one.send("generate", "1", model="pico", prompt="alpha", max_tokens=20)
    two.send("generate", "1", model="nano", prompt="beta", max_tokens=20)
    got = {}
    threads = [threading.Thread(target=lambda c=c, k=k: got.__setitem__(k, c.stream("1")))
               for k, c in (("one", one), ("two", two))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert tokens(got["one"]) == [f"pico:alpha:{i} " for i in range(20)]
    assert tokens(got["two"]) == [f"nano:beta:{i} " for i in range(20)]
    assert got["one"][-1]["done_reason"] == got["two"][-1]["done_reason"] == "length"


def test_requests_to_one_model_queue_and_the_one_past_the_limit_gets_busy(start):
    d = start(queue_limit=1)
    a, b, c = d.client(), d.client(), d.client()
    a.ask("load", model="pico")
    ra = a.send("generate", model="pico", prompt="first", max_tokens=200)
    assert a.next(ra).event == "token"  # a is running
    rb = b.send("generate", model="pico", prompt="second", max_tokens=3)
    wait_for(lambda: len(d.residency._models["pico"].queue) == 1, what="b to wait in the queue")
    busy = c.ask("generate", model="pico", prompt="third")
    assert busy.event == "error" and busy["code"] == "busy" and busy.get("hint")
    rest_a, all_b = a.stream(ra), b.stream(rb)
    assert tokens(rest_a)[-1] == "pico:first:199 " and all("first" in t for t in tokens(rest_a))
    assert tokens(all_b) == [f"pico:second:{i} " for i in range(3)]
    assert d.loader.engines["pico"].max_active == 1
    assert c.ask("generate", model="pico", prompt="third", max_tokens=1).event == "done"  # room again


def test_cancel_stops_a_running_stream_between_tokens(start):
    d = start()
    c = d.client()
    c.ask("load", model="pico")
    running = c.send("generate", model="pico", prompt="long", max_tokens=1000)
    for _ in range(3):
        assert c.next(running).event == "token"
    t0 = time.monotonic()
    assert c.ask("cancel", target=running).event == "ok"
    rest = c.stream(running)
    assert rest[-1].event == "done" and rest[-1]["done_reason"] == "cancelled"
    assert 3 <= rest[-1]["completion_tokens"] < 1000 and time.monotonic() - t0 < 1
    assert d.loader.engines["pico"].cancelled.is_set()
    missing = c.ask("cancel", target=running)  # finished: nothing to cancel
    assert missing.event == "error" and missing["code"] == "not_found"
    other = d.client()  # ids are per client: another one cannot cancel it
    running = c.send("generate", model="pico", prompt="long", max_tokens=30)
    assert other.ask("cancel", target=running)["code"] == "not_found"
    assert c.stream(running)[-1]["done_reason"] == "length"


def test_with_a_stream_interval_the_first_token_goes_alone_and_later_ones_together(start):
    d = start(stream_interval=0.05, loader=FakeLoader(token_delay=0.005))
    c = d.client()
    c.ask("load", model="pico")
    events = c.stream(c.send("generate", model="pico", prompt="fast", max_tokens=30))
    sent = [e for e in events if e.event == "token"]
    assert sent[0]["token_ids"] == [0] and sent[0]["text"] == "pico:fast:0 "
    assert 2 <= len(sent) <= 15  # about 10 tokens per 50 ms; fewer events only if the machine is slow
    assert [i for e in sent for i in e["token_ids"]] == list(range(30))
    assert "".join(e["text"] for e in sent) == "".join(f"pico:fast:{i} " for i in range(30))
    assert events[-1].event == "done" and events[-1]["completion_tokens"] == 30

    running = c.send("generate", model="pico", prompt="long", max_tokens=1000)
    assert c.next(running)["token_ids"] == [0]
    assert c.ask("cancel", target=running).event == "ok"
    rest = c.stream(running)  # what was held back still comes, before the done
    assert rest[-1]["done_reason"] == "cancelled"
    ids = [0] + [i for e in rest[:-1] for i in e["token_ids"]]
    assert ids == list(range(rest[-1]["completion_tokens"]))


def test_tokens_slower_than_the_stream_interval_go_one_per_event(start):
    d = start(stream_interval=0.005, loader=FakeLoader(token_delay=0.03))
    c = d.client()
    events = c.stream(c.send("generate", model="pico", prompt="slow", max_tokens=4))
    assert [e["token_ids"] for e in events if e.event == "token"] == [[0], [1], [2], [3]]


def test_the_stream_interval_comes_from_the_settings(start):
    d = start()
    for seconds in (0.0, 0.02):
        settings = dataclasses.replace(d.settings, stream_interval_seconds=seconds)
        server = Server(Service(settings, d.registry, d.residency))
        server.close()
        assert server.stream_interval == seconds


def test_cancelling_a_queued_request_ends_it_at_once_without_running_it(start):
    d = start(queue_limit=2)
    c = d.client()
    c.ask("load", model="pico")
    running = c.send("generate", model="pico", prompt="long", max_tokens=1000)
    assert c.next(running).event == "token"
    queued = c.send("generate", model="pico", prompt="later", max_tokens=5)  # same socket: in order
    assert c.ask("cancel", target=queued).event == "ok"
    [done] = c.stream(queued)
    assert done.event == "done" and done["done_reason"] == "cancelled" and done["completion_tokens"] == 0
    c.ask("cancel", target=running)
    assert c.stream(running)[-1]["done_reason"] == "cancelled"
    assert c.ask("ps")["ps"][0]["requests"] == 1  # the queued one never ran


def test_a_client_that_leaves_has_its_generation_cancelled(start):
    d = start()
    leaver = d.client()
    leaver.ask("load", model="pico")
    rid = leaver.send("generate", model="pico", prompt="talking to nobody", max_tokens=2000)
    assert leaver.next(rid).event == "token"
    leaver.sock.close(0)
    assert d.loader.engines["pico"].cancelled.wait(3)
    assert d.client().ask("generate", model="pico", prompt="x", max_tokens=1).event == "done"


def test_generate_errors_name_the_problem_and_the_daemon_keeps_serving(start):
    d = start()
    d.registry.upsert("conv", state="converting")
    d.registry.upsert("bad", state="failed", error={"code": "bad_input", "stage": "plan",
                                                    "message": "shard 2 is missing", "hint": "copy it"})
    c = d.client()
    cases = {"nope": "not_found", "conv": "not_found", "bad": "model_failed"}
    for model, code in cases.items():
        reply = c.ask("generate", model=model, prompt="hi")
        assert reply.event == "error" and reply["code"] == code, reply
    assert "shard 2 is missing" in c.ask("generate", model="bad", prompt="hi")["message"]
    boom = c.ask("generate", model="pico", prompt="boom")
    assert boom["code"] == "internal" and "exploded" in boom["message"]
    refused = c.ask("generate", model="pico", prompt="refuse")
    assert refused["code"] == "bad_request" and refused["hint"] == "send a plain prompt"
    sampling = c.ask("generate", model="pico", prompt="hi", top_p=0)
    assert sampling["code"] == "bad_request" and "top_p" in sampling["message"]
    d.loader.fail.add("nano")
    failed = c.ask("generate", model="nano", prompt="hi")
    assert failed["code"] == "model_failed" and "unreadable" in failed["message"]
    assert c.ask("generate", model="pico", prompt="hi", max_tokens=2)["done_reason"] == "length"


# -- malformed frames -----------------------------------------------------------------------

def packed(**fields) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


BAD_FRAMES = {
    "not msgpack, no id": ([b"\xc1\xc1garbage"], None),
    "not a map": ([msgpack.packb([1, 2, 3])], None),
    "map without id": ([packed(v=1, op="hello")], None),
    "id of the wrong type": ([packed(v=1, id=7, op="hello")], None),
    "version missing": ([packed(id="x", op="hello")], "bad_request"),
    "newer version": ([packed(v=2, id="x", op="hello")], "unsupported_version"),
    "unknown op": ([packed(v=1, id="x", op="genrate")], "unknown_op"),
    "wrong type": ([packed(v=1, id="x", op="generate", model="pico", prompt="hi", max_tokens="9")], "bad_request"),
    "unknown field": ([packed(v=1, id="x", op="generate", model="pico", prompt="hi", temprature=1)], "bad_request"),
    "missing field": ([packed(v=1, id="x", op="generate", prompt="hi")], "bad_request"),
    "two frames": ([packed(v=1, id="x", op="hello"), b"more"], "bad_request"),
    "oversized": ([packed(v=1, id="x", op="generate", model="pico", prompt="a" * (70 << 10))], "too_large"),
    "extension type": ([msgpack.packb({"v": 1, "id": "x", "op": "hello", "client": msgpack.ExtType(5, b"e")})],
                       "bad_request"),
}


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    settings = make_settings(tmp, memory_budget=0, max_frame_bytes=64 << 10)
    d = Daemon(settings, make_registry(tmp, {"pico": 1}), FakeLoader())
    yield d
    d.close()


@pytest.mark.parametrize("case", list(BAD_FRAMES))
def test_each_bad_frame_gets_its_documented_answer_and_the_daemon_keeps_serving(shared_daemon, case):
    frames, code = BAD_FRAMES[case]
    c = shared_daemon.client()
    c.sock.send_multipart(frames)
    if code is None:
        assert c.silent(), "a frame without a usable id must be dropped"
    else:
        reply = c.next("x")
        assert reply.event == "error" and reply["code"] == code and reply["message"]
        if code == "unsupported_version":
            assert reply["protocol"] == 1 and "anemlld" in reply["hint"]
        if code == "unknown_op":
            assert "generate" in reply["hint"]
    assert c.ask("hello").event == "hello"


def test_a_reused_id_in_flight_is_refused(start):
    d = start()
    c = d.client()
    c.ask("load", model="pico")
    c.send("generate", "same", model="pico", prompt="x", max_tokens=200)
    assert c.next("same").event == "token"
    c.send("hello", "same")
    events = c.stream("same")
    assert events[-1].event == "error" and events[-1]["code"] == "bad_request" and "already" in events[-1]["message"]
    rest = c.stream("same")  # the first request is not disturbed
    assert rest[-1].event == "done" and rest[-1]["completion_tokens"] == 200


# -- residency through the wire -----------------------------------------------------------

def test_keep_alive_0_unloads_the_model_after_the_request(start):
    d = start()
    c = d.client()
    assert c.ask("generate", model="pico", prompt="hi", max_tokens=2, keep_alive=0).event == "done"
    wait_for(lambda: c.ask("ps")["ps"] == [], what="unload after the request")
    assert {m["name"]: m["state"] for m in c.ask("models")["models"]}["pico"] == "ready"


def test_a_model_whose_keep_alive_runs_out_is_unloaded_by_the_reaper(start):
    d = start(keep_alive=0.3)
    c = d.client()
    c.ask("generate", model="pico", prompt="hi", max_tokens=1)
    assert [m["name"] for m in c.ask("ps")["ps"]] == ["pico"]
    wait_for(lambda: c.ask("ps")["ps"] == [], timeout=3, what="expiry")


def test_load_unload_and_pin(start):
    d = start(keep_alive=0.2)
    c = d.client()
    rid = c.send("pin", model="pico")
    events = c.stream(rid)
    assert events[-1].event == "ok" and events[0].event == "progress"
    time.sleep(0.4)
    [ps] = c.ask("ps")["ps"]
    assert ps["pinned"] and ps["expires_at"] is None
    assert c.ask("pin", model="pico", pin=False).event == "ok"
    wait_for(lambda: c.ask("ps")["ps"] == [], what="unpinned model to expire")
    assert c.ask("load", model="nano", keep_alive=-1).event == "ok"
    assert c.ask("ps")["ps"][0]["expires_at"] is None
    assert c.ask("unload", model="nano").event == "ok" and c.ask("ps")["ps"] == []
    for op in ("load", "unload", "pin"):
        assert c.ask(op, model="nope")["code"] == "not_found"


def test_watch_streams_loads_and_model_changes_until_cancelled(start):
    d = start()
    w, c = d.client(), d.client()
    watch = w.send("watch")
    c.ask("load", model="pico")
    seen = [w.next(watch) for _ in range(6)]  # five progress events and the state change
    assert [e.event for e in seen].count("progress") == 5
    models = [e["model"] for e in seen if e.event == "model"]
    assert models and models[0]["name"] == "pico" and models[0]["state"] == "loaded"
    d.server.job_progress({"job": 3, "name": "qwen", "stage": "export", "part": "qwen_embeddings",
                           "fraction": 0.25})
    job = w.next(watch)
    assert (job["kind"], job["job"], job["model"], job["fraction"]) == ("convert", 3, "qwen", 0.25)
    assert w.ask("cancel", target=watch).event == "ok"
    assert w.next(watch).data == {"done_reason": "cancelled"}
    d.registry.upsert("pico", size_bytes=11)
    assert w.silent(200)  # nothing more after done


class FakeJobs:
    def __init__(self):
        self.calls = []
        self.progress = None

    def list(self):
        return [{"job": 1, "name": "qwen", "source": Path("/drop/qwen"), "state": "queued", "stage": "",
                 "part": "", "fraction": 0.0, "created_at": 1.0, "updated_at": 1.0, "error": None}]

    def convert_path(self, path, name=None, options=None):
        self.calls.append(("convert", path, name, options))
        if not os.path.isdir(path):
            raise AnemllError(f"{path} is not a folder", "give a Hugging Face model folder", code="bad_input")
        return {"job": 2, "name": name or Path(path).name}

    def retry(self, name):
        self.calls.append(("retry", name))
        if name != "qwen":
            raise KeyError(f"no failed model named {name!r}")
        return {"job": 3, "name": name}


def test_jobs_convert_and_retry_go_to_jobs(start, tmp_path):
    jobs = FakeJobs()
    d = start(jobs=jobs)
    c = d.client()
    assert c.ask("hello")["capabilities"][-5:-3] == ["convert", "retry"]
    [job] = c.ask("jobs")["jobs"]
    assert job["source"] == "/drop/qwen"
    ok = c.ask("convert", path=str(tmp_path), name="qwen", options={"context_length": 1024})
    assert (ok.event, ok["job"], ok["name"]) == ("ok", 2, "qwen")
    assert jobs.calls[0] == ("convert", str(tmp_path), "qwen", {"context_length": 1024})
    assert c.ask("convert", path="/no/such/folder")["code"] == "bad_request"
    assert c.ask("convert", path="relative/path")["code"] == "bad_request"
    assert (c.ask("retry", name="qwen")["job"], c.ask("retry", name="pico")["code"]) == (3, "not_found")


def test_without_jobs_convert_and_retry_are_unknown_ops(start):
    c = start().client()
    assert c.ask("retry", name="x")["code"] == "unknown_op"


def test_stop_cancels_running_generations_and_serve_forever_returns(start):
    d = start()
    c = d.client()
    c.ask("load", model="pico")
    rid = c.send("generate", model="pico", prompt="x", max_tokens=5000)
    assert c.next(rid).event == "token"
    t0 = time.monotonic()
    d.server.stop()
    d.thread.join(3)
    assert not d.thread.is_alive() and time.monotonic() - t0 < 1.5
    assert c.stream(rid)[-1]["done_reason"] == "cancelled"


# -- TCP with CURVE ---------------------------------------------------------------------------

def test_tcp_serves_clients_with_known_curve_keys_only(tmp_path):
    import zmq.auth

    keys, clients = tmp_path / "keys", tmp_path / "keys" / "clients"
    clients.mkdir(parents=True)
    zmq.auth.create_certificates(keys, "server")
    os.chmod(keys / "server.key_secret", 0o600)
    zmq.auth.create_certificates(keys, "alice")
    os.rename(keys / "alice.key", clients / "alice.key")
    zmq.auth.create_certificates(tmp_path, "mallory")
    home = tmp_path / "home"
    home.mkdir()
    with zmq.Context() as probe_ctx:  # a free port
        probe = probe_ctx.socket(zmq.ROUTER)
        port = probe.bind_to_random_port("tcp://127.0.0.1")
        probe.close(0)
    (home / "settings.toml").write_text(
        f'[tcp]\nenabled = true\nbind = "tcp://127.0.0.1:{port}"\n'
        f'server_key = "{keys / "server.key_secret"}"\nclient_keys = "{clients}"\n')
    settings = dataclasses.replace(Settings.load(home=home), memory_budget=0)
    d = Daemon(settings, make_registry(tmp_path, {"pico": 1}), FakeLoader())
    try:
        server_public, _ = zmq.auth.load_certificate(keys / "server.key")

        def tcp_client(name: str, folder: Path) -> Client:
            public, secret = zmq.auth.load_certificate(folder / f"{name}.key_secret")
            client = Client(d.ctx, f"tcp://127.0.0.1:{port}", curve_serverkey=server_public,
                            curve_publickey=public, curve_secretkey=secret)
            d.clients.append(client)
            return client

        alice = tcp_client("alice", keys)
        assert alice.ask("generate", model="pico", prompt="hi", max_tokens=2).event == "done"
        mallory = tcp_client("mallory", tmp_path)
        mallory.send("hello")
        assert mallory.silent(500)
        plain = Client(d.ctx, f"tcp://127.0.0.1:{port}")
        d.clients.append(plain)
        plain.send("hello")
        assert plain.silent(300)
        assert d.client().ask("hello").event == "hello"  # ipc still needs no keys
    finally:
        d.close()


# -- a real converted model -------------------------------------------------------------------

def test_a_real_converted_model_streams_the_same_answer_as_the_engine(tiny_models, tmp_path):
    from anemlld.convert.pipeline import convert
    from anemlld.runtime.engine import Engine
    from anemlld.runtime.sampling import SamplingParams
    from shared.options import ConvertOptions

    out = tmp_path / "tiny-ane"
    convert(tiny_models["llama"], out, ConvertOptions(context_length=64, batch_size=16, lut_ffn=None,
                                                      lut_lm_head=None))
    registry = Registry()
    registry.upsert("tiny", state="ready", path=str(out))
    settings = make_settings(tmp_path, memory_budget=0)
    d = Daemon(settings, registry, lambda entry: Engine(entry.path, executor="portable"))
    try:
        c = d.client()
        events = c.stream(c.send("generate", model="tiny", prompt="The shell reads", max_tokens=12))
        done = events[-1]
        assert done.event == "done", done.data
        assert done["completion_tokens"] >= 1 and done["load_ms"] > 0 and done["prompt_tokens"] > 1
        text = "".join(tokens(events))
        ids = [i for e in events if e.event == "token" for i in e["token_ids"]]
        want = Engine(out, executor="portable").complete(prompt="The shell reads",
                                                         params=SamplingParams(max_tokens=12))
        assert ids == want.token_ids and text == want.text
        assert c.ask("ps")["ps"][0]["context_length"] == 64
    finally:
        d.close()
