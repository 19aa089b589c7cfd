"""anemll-chat against a fake daemon: a ROUTER thread on a temp home's socket
speaking docs/protocol.md through shared.protocol (decode_request,
encode_event), scripted with models, resident models, jobs and a watch stream,
streaming answers token by token and honouring `cancel`.

The client runs as it does for users, in its own interpreter (`python -m
client.cli`), so exit codes, stdout/stderr and the terminal are real; the REPL
runs under a pseudo-terminal and gets a real Ctrl-C (the \\x03 byte)."""
from __future__ import annotations

import heapq
import itertools
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import msgpack
import pytest
import zmq

from client.models import NoModel, choose_model, read_last_model, remember_model
from shared import protocol as p
from shared.settings import Settings

REPO = Path(__file__).resolve().parents[1]
NOW = time.time()

PICO = {"name": "pico", "state": "loaded", "source": "/drop/pico-llama",
        "options": {"context_length": 512, "lut_ffn": "4"}, "size_bytes": 4718592, "error": None}
TINY = {"name": "tiny", "state": "ready", "source": "/drop/tiny", "options": {"context_length": 256},
        "size_bytes": 1048576, "error": None}
QWEN_FAILED = {"name": "qwen", "state": "failed", "source": "/failed/Qwen2.5-0.5B", "options": {},
               "size_bytes": None,
               "error": {"code": "bad_input", "stage": "plan",
                         "message": "shard model-00002-of-00002.safetensors is missing",
                         "hint": "copy the missing shard, then run: anemll-chat --retry qwen"}}
QWEN_CONVERTING = {**QWEN_FAILED, "state": "converting", "error": None, "source": "/drop/Qwen2.5-0.5B"}
DONE_JOB = {"job": 6, "name": "pico", "source": "/drop/pico-llama", "state": "done", "stage": "publish",
            "part": "", "fraction": 1.0, "created_at": NOW - 700, "updated_at": NOW - 667, "error": None}


def qwen_job() -> dict:
    """A job running for 3m12s (plus the time it takes to be shown: under a second)."""
    return {"job": 7, "name": "qwen", "source": "/drop/Qwen2.5-0.5B", "state": "running", "stage": "quantize",
            "part": "qwen_FFN_PF_lut4_chunk_01of02", "fraction": 0.42, "created_at": time.time() - 191.6,
            "updated_at": time.time() - 1, "error": None}


def echo(request: p.Generate) -> list[str]:
    """The fake model: 'You said: <the last user message>' a word per token."""
    text = request.messages[-1]["content"] if request.messages else request.prompt
    return ["You", " said:"] + [" " + w for w in text.split()]


# -- the fake daemon -------------------------------------------------------------

@dataclass
class FakeDaemon:
    """Serves one temp home. Every decoded request is kept in ``requests``."""

    settings: Settings
    models: list[dict] = field(default_factory=lambda: [dict(PICO)])
    ps: list[dict] = field(default_factory=list)
    jobs: list[dict] = field(default_factory=list)
    watch_script: list[tuple[float, str, dict]] = field(default_factory=list)  # (delay, event, fields)
    reply: Callable[[p.Generate], list[str]] = echo
    token_delay: float = 0.0
    generate_error: dict | None = None  # answer every generate with this error
    protocol: int = p.PROTOCOL_VERSION  # another number: answer everything unsupported_version
    mute: threading.Event = field(default_factory=threading.Event)  # set: hear nothing, say nothing (hung)
    http: str | None = None  # the HTTP base URL hello reports
    capabilities: list[str] = field(default_factory=lambda: [*p.REQUESTS, *p.FIELD_CAPABILITIES])

    def __post_init__(self) -> None:
        self.requests: list[p.Request] = []
        self.cancelled: list[str] = []
        self._streams: list[tuple] = []  # (due, order, peer, id, steps, next step): a heap by due time
        self._order = itertools.count()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> "FakeDaemon":
        self.settings.make_dirs()
        self._thread.start()
        assert self._ready.wait(5)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def of(self, op: type[p.Request]) -> list:
        return [r for r in self.requests if isinstance(r, op)]

    def _serve(self) -> None:
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.settings.endpoint)
        self._ready.set()
        try:
            while not self._stop.is_set():
                due = self._streams[0][0] - time.monotonic() if self._streams else 0.05
                if sock.poll(max(0, min(int(due * 1000), 50))):
                    peer, frame = sock.recv_multipart()
                    if not self.mute.is_set():
                        self._handle(sock, peer, frame)
                if not self.mute.is_set():
                    self._run_due(sock)
        finally:
            sock.close(0)

    def _send(self, sock, peer: bytes, rid: str, event: str, **fields) -> None:
        sock.send_multipart([peer, p.encode_event(rid, event, **fields)])

    def _handle(self, sock, peer: bytes, frame: bytes) -> None:
        if self.protocol != p.PROTOCOL_VERSION:
            rid = msgpack.unpackb(frame)["id"]
            hint = "update the client" if self.protocol > p.PROTOCOL_VERSION else "update anemlld (the daemon)"
            sock.send_multipart([peer, p.encode_error(rid, "unsupported_version", "protocol mismatch", hint,
                                                      protocol=self.protocol)])
            return
        try:
            req = p.decode_request(frame)
        except p.ProtocolError as e:
            if e.to_frame() is not None:
                sock.send_multipart([peer, e.to_frame()])
            return
        self.requests.append(req)
        send = lambda event, **f: self._send(sock, peer, req.id, event, **f)  # noqa: E731
        if isinstance(req, p.Hello):
            send("hello", server="anemlld", version="0.1.0", protocol=p.PROTOCOL_VERSION,
                 capabilities=self.capabilities, max_frame_bytes=p.DEFAULT_MAX_FRAME_BYTES, http=self.http)
        elif isinstance(req, p.Models):
            send("models", models=self.models)
        elif isinstance(req, p.Ps):
            send("ps", ps=self.ps)
        elif isinstance(req, p.Jobs):
            send("jobs", jobs=self.jobs)
        elif isinstance(req, p.Cancel):
            found = [s for s in self._streams if s[2] == peer and s[3] == req.target]
            if not found:
                send("error", code="not_found", message=f"no request {req.target!r} of yours is running")
                return
            self._streams = [s for s in self._streams if s not in found]
            heapq.heapify(self._streams)
            self.cancelled.append(req.target)
            send("ok")
            self._send(sock, peer, req.target, "done", done_reason="cancelled",
                       **({"prompt_tokens": 5, "cached_tokens": 0, "completion_tokens": 1, "prefill_ms": 1.0,
                           "decode_ms": 1.0, "load_ms": 0.0, "tokens_per_s": 1.0}
                          if isinstance(self._request(req.target), p.Generate) else {}))
        elif isinstance(req, p.Generate):
            if self.generate_error is not None:
                send("error", **self.generate_error)
            elif not any(m["name"] == req.model for m in self.models):
                send("error", code="not_found", message=f"no model named {req.model!r}")
            else:
                self._start(peer, req.id, self._generate(req))
        elif isinstance(req, p.Watch):
            self._start(peer, req.id, self._watch())
        elif isinstance(req, (p.Load, p.Pin, p.Unload)):
            self._start(peer, req.id, self._load(req))
        elif isinstance(req, (p.Convert, p.Retry)):
            send("ok", job=8, name=getattr(req, "name", None) or "converted")

    def _request(self, rid: str) -> p.Request | None:
        return next((r for r in reversed(self.requests) if r.id == rid), None)

    def _start(self, peer: bytes, rid: str, events: Iterator) -> None:
        """Schedule a stream: each step (delay, event, fields) is sent ``delay`` after the previous one."""
        step = next(events, None)
        if step is not None:
            heapq.heappush(self._streams, (time.monotonic() + step[0], next(self._order), peer, rid, events, step))

    def _run_due(self, sock) -> None:
        while self._streams and self._streams[0][0] <= time.monotonic():
            _, _, peer, rid, events, (_, event, fields) = heapq.heappop(self._streams)
            self._send(sock, peer, rid, event, **fields)
            if event not in p.FINAL_EVENTS:
                self._start(peer, rid, events)

    def _model(self, name: str) -> dict:
        return next(m for m in self.models if m["name"] == name)

    def _load_events(self, name: str) -> Iterator:
        model = self._model(name)
        if model["state"] != "loaded":
            for fraction in (0.33, 0.66, 1.0):
                yield 0.0, "progress", dict(kind="load", model=name, stage="load", part="part", fraction=fraction)
            model["state"] = "loaded"

    def _generate(self, req: p.Generate) -> Iterator:
        load_ms = 820.0 if self._model(req.model)["state"] != "loaded" else 0.0
        yield from self._load_events(req.model)
        tokens = self.reply(req)
        for i, text in enumerate(tokens):
            yield self.token_delay if i else 0.0, "token", dict(text=text, token_ids=[100 + i])
        yield 0.0, "done", dict(done_reason="stop", prompt_tokens=31, cached_tokens=0,
                                completion_tokens=len(tokens), prefill_ms=41.2, decode_ms=590.3,
                                load_ms=load_ms, tokens_per_s=96.6, prefill_tokens=31)

    def _load(self, req: p.Request) -> Iterator:
        if isinstance(req, p.Unload):
            self._model(req.model)["state"] = "ready"
        else:
            yield from self._load_events(req.model)
        yield 0.0, "ok", {}

    def _watch(self) -> Iterator:
        for delay, event, fields in self.watch_script:
            if event == "model":  # later `models` answers see the change
                self._model(fields["model"]["name"]).update(fields["model"])
            yield delay, event, fields
        while True:  # a watch lasts until cancelled
            yield 3600.0, "progress", dict(kind="convert", job=0, model="-", stage="idle", fraction=0.0)


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "home"


def daemon(home: Path, **kw) -> FakeDaemon:
    return FakeDaemon(Settings.load(home=home, env={}), **kw)


def chat(home: Path, *args: str, input: str | None = None, timeout: float = 20) -> subprocess.CompletedProcess:
    """`anemll-chat --home HOME ARGS` in its own interpreter, stdout and stderr
    captured (so neither is a terminal), stdin empty unless ``input``."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("ANEMLL_HOME", None)
    return subprocess.run([sys.executable, "-m", "client.cli", "--home", str(home), *args], cwd=REPO, env=env,
                          input=input if input is not None else "", capture_output=True, text=True,
                          timeout=timeout)


# -- one-shot --------------------------------------------------------------------

def test_one_shot_prints_the_streamed_answer_and_exits_0(home):
    with daemon(home, token_delay=0.01) as d:
        out = chat(home, "pico", "-p", "what is the ANE?")
    assert (out.returncode, out.stdout, out.stderr) == (0, "You said: what is the ANE?\n", "")
    (gen,) = d.of(p.Generate)
    assert gen.model == "pico" and gen.messages == ({"role": "user", "content": "what is the ANE?"},)
    assert gen.session is None and gen.prompt is None


def test_question_on_stdin_is_answered_with_the_sampling_options_given(home):
    with daemon(home) as d:
        out = chat(home, "pico", "--temperature", "0.7", "--seed", "42", "--system", "Be brief.",
                   input="hello there\n")
    assert (out.returncode, out.stdout) == (0, "You said: hello there\n")
    (gen,) = d.of(p.Generate)
    assert (gen.temperature, gen.seed) == (0.7, 42)
    assert gen.messages == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"})


def test_format_sends_the_schema_file_and_a_bad_file_is_refused_before_sending(home, tmp_path):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    (tmp_path / "broken.json").write_text("{nope")
    with daemon(home) as d:
        out = chat(home, "pico", "--format", str(tmp_path / "schema.json"), "-p", "ok?")
        broken = chat(home, "pico", "--format", str(tmp_path / "broken.json"), "-p", "ok?")
        no_question = chat(home, "--list", "--format", "json")
    with daemon(home, capabilities=list(p.REQUESTS)) as old:  # an anemlld from before structured output
        refused = chat(home, "pico", "--format", str(tmp_path / "schema.json"), "-p", "ok?")
    assert refused.returncode == 2 and "does not know --format" in refused.stderr and not old.of(p.Generate)
    assert out.returncode == 0
    (gen,) = d.of(p.Generate)
    assert gen.format == schema and gen.messages[-1]["content"] == "ok?"
    assert broken.returncode == 2 and "broken.json is not JSON" in broken.stderr
    assert no_question.returncode == 2 and "--format is for one answer" in no_question.stderr


def test_stats_line_goes_to_stderr_so_the_answer_stays_clean(home):
    with daemon(home):
        out = chat(home, "pico", "-p", "hi", "--stats")
    assert out.stdout == "You said: hi\n"
    assert out.stderr.strip() == ("31 prompt tokens, 3 generated, prefill 752.4 tok/s, decode 96.6 tok/s, "
                                  "load 0.00 s")


def test_json_prints_every_event_of_the_answer_as_a_json_line(home):
    with daemon(home) as d:
        out = chat(home, "pico", "-p", "one two", "--json")
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    assert [e["event"] for e in events] == ["token"] * 4 + ["done"]
    assert "".join(e["text"] for e in events[:-1]) == "You said: one two"
    assert {e["id"] for e in events} == {d.of(p.Generate)[0].id}
    assert events[-1]["done_reason"] == "stop" and events[-1]["completion_tokens"] == 4


def test_an_error_event_prints_one_error_line_with_its_hint_and_exits_1(home):
    error = {"code": "context_overflow", "message": "the prompt needs 900 tokens, the context is 512",
             "hint": "re-convert with context_length = 1024"}
    with daemon(home, generate_error=error):
        out = chat(home, "pico", "-p", "long")
    assert out.returncode == 1
    assert out.stderr == ("error: the prompt needs 900 tokens, the context is 512\n"
                          "  -> re-convert with context_length = 1024\n")
    assert out.stdout == ""


def test_an_unknown_model_is_an_error_naming_the_models_there_are(home):
    with daemon(home, models=[dict(PICO), dict(TINY)]):
        out = chat(home, "pcio", "-p", "hi")
    assert out.returncode == 1
    assert out.stderr == "error: no model named 'pcio'\n  -> models: pico, tiny\n"


# -- management ------------------------------------------------------------------

def test_list_shows_models_with_state_size_and_errors_in_plain_text(home):
    with daemon(home, models=[dict(PICO), dict(TINY), dict(QWEN_FAILED)]):
        out = chat(home, "--list")
    assert out.returncode == 0 and "\x1b" not in out.stdout
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "SIZE", "CONTEXT", "SOURCE"]
    assert lines[1].split() == ["pico", "loaded", "4.5", "MiB", "512", "/drop/pico-llama"]
    assert lines[2].split() == ["tiny", "ready", "1.0", "MiB", "256", "/drop/tiny"]
    assert lines[3].split() == ["qwen", "failed", "-", "-", "/failed/Qwen2.5-0.5B"]
    assert lines[4:] == ["    error (plan): shard model-00002-of-00002.safetensors is missing",
                         "    -> copy the missing shard, then run: anemll-chat --retry qwen"]


def test_list_with_json_prints_the_models_event(home):
    with daemon(home):
        out = chat(home, "--list", "--json")
    (event,) = [json.loads(line) for line in out.stdout.splitlines()]
    assert event["event"] == "models" and event["models"][0]["name"] == "pico"


def test_list_with_no_models_says_where_to_drop_one(home):
    with daemon(home, models=[]):
        out = chat(home, "--list")
    assert out.returncode == 0
    assert out.stdout == (f"no models yet: drop a Hugging Face model folder into {home / 'drop'}, "
                          "or run: anemll-chat --convert PATH\n")


def test_ps_shows_resident_models_and_when_they_expire(home):
    ps = [{"name": "pico", "size_bytes": 6291456, "pinned": False, "expires_at": time.time() + 29 * 60 + 30,
           "requests": 12, "context_length": 512},
          {"name": "tiny", "size_bytes": 2097152, "pinned": True, "expires_at": None, "requests": 0,
           "context_length": 256}]
    with daemon(home, ps=ps):
        out = chat(home, "--ps")
    assert out.returncode == 0 and "\x1b" not in out.stdout
    lines = [line.split() for line in out.stdout.splitlines()]
    assert lines[0] == ["NAME", "SIZE", "UNTIL", "REQUESTS", "CONTEXT"]
    assert lines[1][:4] == ["pico", "6.0", "MiB", "in"] and lines[1][4] in ("29m30s", "29m29s", "29m28s")
    assert lines[1][5:] == ["12", "512"]
    assert lines[2] == ["tiny", "2.0", "MiB", "pinned", "0", "256"]


def test_ps_with_nothing_loaded_says_so(home):
    with daemon(home):
        assert chat(home, "--ps").stdout == "no models are loaded\n"


def test_ps_names_the_http_address_the_daemon_serves(home):
    with daemon(home, http="http://127.0.0.1:11435"):
        assert chat(home, "--ps").stdout.splitlines()[-1] == (
            "HTTP: http://127.0.0.1:11435 (OpenAI at http://127.0.0.1:11435/v1, Ollama at http://127.0.0.1:11435)")


def test_jobs_shows_each_job_with_its_progress_and_no_bars_when_not_a_tty(home):
    with daemon(home, jobs=[dict(DONE_JOB), qwen_job()]):
        out = chat(home, "--jobs")
    assert out.returncode == 0 and "\x1b" not in out.stdout and "█" not in out.stdout and "#" not in out.stdout
    lines = [line.split() for line in out.stdout.splitlines()]
    assert lines[0] == ["JOB", "NAME", "STATE", "STAGE", "PROGRESS", "TIME", "DETAIL"]
    assert lines[1] == ["6", "pico", "done", "publish", "100%", "took", "33s"]
    assert lines[2][:7] == ["7", "qwen", "running", "quantize", "42%", "for", "3m12s"]
    assert lines[2][7:] == ["qwen_FFN_PF_lut4_chunk_01of02"]


def test_jobs_watch_follows_the_jobs_until_all_have_finished(home):
    script = [(0.05, "progress", dict(kind="convert", job=7, model="qwen", stage="quantize", part="x",
                                      fraction=0.6, message="")),
              (0.05, "progress", dict(kind="convert", job=7, model="qwen", stage="combine", part="x",
                                      fraction=0.9, message="")),
              (0.05, "model", dict(model={**QWEN_CONVERTING, "state": "ready", "size_bytes": 9 << 20}))]
    with daemon(home, models=[dict(PICO), dict(QWEN_CONVERTING)], jobs=[qwen_job()], watch_script=script) as d:
        start = time.monotonic()
        out = chat(home, "--jobs", "--watch")
        took = time.monotonic() - start
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[1].split()[:5] == ["7", "qwen", "running", "quantize", "42%"]
    assert [line.split()[:5] for line in lines[2:4]] == [["job", "7", "qwen", "running", "combine"],
                                                         ["job", "7", "qwen", "done", "combine"]]
    assert lines[-1] == "all jobs finished"
    (watch,) = d.of(p.Watch)
    assert d.cancelled == [watch.id]  # the watch is cancelled, not left running
    assert took < 5


def test_jobs_watch_with_nothing_to_follow_returns_at_once(home):
    with daemon(home, jobs=[dict(DONE_JOB)]):
        out = chat(home, "--jobs", "--watch")
    assert out.returncode == 0 and out.stdout.splitlines()[-1] == "all jobs finished"


def test_convert_sends_the_absolute_path_and_options_and_says_how_to_follow(home, tmp_path):
    src = tmp_path / "Qwen2.5-0.5B"
    src.mkdir()
    with daemon(home) as d:
        out = subprocess.run([sys.executable, "-m", "client.cli", "--home", str(home), "--convert", src.name,
                              "--name", "qwen", "-o", "context_length=1024", "-o", "lut_ffn=4"],
                             cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                             text=True, timeout=20)
        retry = chat(home, "--retry", "qwen")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "queued job 8: qwen\nfollow it with: anemll-chat --jobs --watch\n"
    convert, retry_req = d.of(p.Convert)[0], d.of(p.Retry)[0]
    assert (convert.path, convert.name, convert.options) == (str(src), "qwen", {"context_length": 1024, "lut_ffn": 4})
    assert retry.returncode == 0 and retry_req.name == "qwen"


def test_a_bad_convert_option_is_refused_before_sending(home):
    with daemon(home) as d:
        out = chat(home, "--convert", "/x", "-o", "lut_fnn=4")
    assert out.returncode == 1
    assert out.stderr.startswith("error: there is no conversion option 'lut_fnn'\n  -> did you mean lut_ffn?")
    assert not d.of(p.Convert)


# -- the daemon cannot be talked to ----------------------------------------------------

def test_daemon_not_running_prints_one_line_saying_how_to_start_it_and_exits_2(home):
    out = chat(home, "pico", "-p", "hi")
    sock = Settings.load(home=home, env={}).socket_path
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == (f"anemlld is not running (no socket at {sock}). Start it with `anemlld` in a "
                          "terminal, or `anemlld install` for the LaunchAgent.\n")


def test_a_socket_file_nobody_answers_on_counts_as_not_running(home):
    settings = Settings.load(home=home, env={})
    settings.make_dirs()
    settings.socket_path.touch()  # left behind by a daemon that crashed
    start = time.monotonic()
    out = chat(home, "--list")
    took = time.monotonic() - start
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith(f"anemlld is not running (no answer at {settings.socket_path} within 2 s)")
    assert 2 <= took < 8


@pytest.mark.parametrize("daemon_protocol, update", [(2, "update anemll-chat (the client)"),
                                                     (0, "update anemlld (the daemon)")])
def test_a_protocol_mismatch_says_which_side_to_update(home, daemon_protocol, update):
    with daemon(home, protocol=daemon_protocol):
        out = chat(home, "--list")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith(f"anemlld speaks protocol {daemon_protocol} and this anemll-chat speaks 1: {update}")


def test_a_slow_daemon_is_waited_for_but_a_hung_one_is_reported(home):
    """While a stream is silent the client asks `hello`: a daemon that answers
    is still there (however slow its tokens), one that answers nothing is gone."""
    from client.connection import Connection, NotReachable

    slow = lambda req: ["slow", " but", " there"]  # noqa: E731
    with daemon(home, reply=slow, token_delay=0.6) as d:
        conn = Connection(d.settings, ping_after=0.2, lost_after=0.3)
        conn.open()
        events = list(conn.stream(p.Generate(id=conn.next_id(), model="pico", prompt="x")))
        assert "".join(e.get("text", "") for e in events) == "slow but there"
        assert len(d.of(p.Hello)) > 1  # pinged while the tokens were slow
        d.mute.set()
        start = time.monotonic()
        with pytest.raises(NotReachable, match="anemlld stopped answering"):
            list(conn.stream(p.Generate(id=conn.next_id(), model="pico", prompt="x")))
        assert time.monotonic() - start < 2
        conn.close()


def test_ctrl_c_stops_a_one_shot_answer_with_exit_code_130(home):
    long_answer = lambda req: [f" word{i}" for i in range(400)]  # noqa: E731
    with daemon(home, reply=long_answer, token_delay=0.02) as d:
        proc = subprocess.Popen([sys.executable, "-m", "client.cli", "--home", str(home), "pico", "-p", "go"],
                                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.read(12) == " word0 word1"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 130 and "Traceback" not in err
    assert "word399" not in out
    assert d.cancelled == [d.of(p.Generate)[0].id]


# -- which model -------------------------------------------------------------------

SETTINGS = Settings.load(home="/tmp/anemll-choice-test", env={})


@pytest.mark.parametrize("models, last, chosen", [
    ([PICO], None, "pico"),  # the only one
    ([PICO, QWEN_FAILED], "qwen", "pico"),  # the only usable one beats a failed last one
    ([PICO, TINY], "tiny", "tiny"),  # several: the last used
    ([QWEN_CONVERTING], None, "qwen"),  # nothing ready: the one converting (its progress is shown)
    ([PICO, TINY, QWEN_CONVERTING], "qwen", "qwen"),
])
def test_without_a_model_name_the_only_ready_one_or_the_last_used_is_chosen(models, last, chosen):
    assert choose_model(models, last, SETTINGS) == chosen


@pytest.mark.parametrize("models, last, message, hint", [
    ([PICO, TINY], None, "which model? pico (loaded), tiny (ready)", "name one: anemll-chat pico (or tiny)"),
    ([PICO, TINY], "gone", "which model? pico (loaded), tiny (ready)", "name one: anemll-chat pico (or tiny)"),
    ([], None, "there are no models yet", "drop a Hugging Face model folder into /tmp/anemll-choice-test/drop, "
                                          "or run: anemll-chat --convert PATH"),
    ([QWEN_FAILED], None, "no model can answer: qwen (failed)", "see why with: anemll-chat --list"),
])
def test_without_a_model_name_and_no_clear_choice_the_choices_are_listed(models, last, message, hint):
    with pytest.raises(NoModel) as info:
        choose_model(models, last, SETTINGS)
    assert (info.value.message, info.value.hint) == (message, hint)


def test_the_last_used_model_is_remembered_under_the_home(home):
    settings = Settings.load(home=home, env={})
    assert read_last_model(settings) is None
    with daemon(home, models=[dict(PICO), dict(TINY)]) as d:
        first = chat(home, "-p", "hi")
        assert chat(home, "tiny", "-p", "hi").returncode == 0
        again = chat(home, "-p", "hi")
    assert first.returncode == 2 and first.stderr == ("error: which model? pico (loaded), tiny (ready)\n"
                                                      "  -> name one: anemll-chat pico (or tiny)\n")
    assert (home / "state" / "chat" / "last_model").read_text() == "tiny\n"
    assert again.returncode == 0 and [g.model for g in d.of(p.Generate)] == ["tiny", "tiny"]
    remember_model(settings, "pico")
    assert read_last_model(settings) == "pico"


# -- a model still converting --------------------------------------------------------

def converting_script(end_state: dict) -> list:
    return [(0.05, "progress", dict(kind="convert", job=7, model="qwen", stage="combine", part="x",
                                    fraction=0.9, message="")),
            (0.05, "model", dict(model=end_state))]


def test_a_model_still_converting_is_waited_for_then_answers(home):
    script = converting_script({**QWEN_CONVERTING, "state": "ready", "size_bytes": 9 << 20})
    with daemon(home, models=[dict(QWEN_CONVERTING)], jobs=[qwen_job()], watch_script=script) as d:
        out = chat(home, "qwen", "-p", "hi")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "You said: hi\n"
    assert out.stderr.splitlines() == ["waiting for qwen: running quantize 42%",
                                       "waiting for qwen: running combine 90%"]
    assert d.cancelled == [d.of(p.Watch)[0].id]


def test_a_model_that_fails_while_waited_for_reports_its_error(home):
    script = converting_script({**QWEN_FAILED})
    with daemon(home, models=[dict(QWEN_CONVERTING)], jobs=[qwen_job()], watch_script=script) as d:
        out = chat(home, "qwen", "-p", "hi")
    assert out.returncode == 1
    assert out.stderr.splitlines()[-2:] == [
        "error: qwen failed to convert at plan: shard model-00002-of-00002.safetensors is missing",
        "  -> copy the missing shard, then run: anemll-chat --retry qwen"]
    assert not d.of(p.Generate)


def test_no_wait_says_how_long_a_conversion_has_run_and_how_to_follow_it(home):
    with daemon(home, models=[dict(QWEN_CONVERTING)], jobs=[qwen_job()]) as d:
        out = chat(home, "qwen", "-p", "hi", "--no-wait")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == ("error: qwen is still converting (job 7, running for 3m12s, at quantize 42%)\n"
                          "  -> follow it with: anemll-chat --jobs --watch, then run: anemll-chat qwen\n")
    assert not d.of(p.Watch) and not d.of(p.Generate)


# -- lightness -----------------------------------------------------------------------

def test_the_client_never_imports_torch_numpy_coremltools_or_transformers():
    code = ("import sys\n"
            "import client.cli, client.repl, client.chat, client.connection, client.jobs, client.manage, "
            "client.models, client.render\n"
            "heavy = [m for m in ('torch', 'coremltools', 'transformers', 'numpy') if m in sys.modules]\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_help_returns_in_well_under_a_second():
    commands = [[sys.executable, "-m", "client.cli", "--help"]]
    entry = Path(sys.executable).parent / "anemll-chat"
    if entry.exists():
        commands.append([str(entry), "--help"])
    for command in commands:
        start = time.monotonic()
        out = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        took = time.monotonic() - start
        print(f"{' '.join(Path(c).name for c in command)}: {took * 1000:.0f} ms")
        assert out.returncode == 0 and "usage: anemll-chat" in out.stdout
        assert took < 1.0


# -- the chat, under a pseudo-terminal -------------------------------------------------------

class Terminal:
    """A child process on a pseudo-terminal: what it prints is read as a user
    would see it; Ctrl-C is the \\x03 byte, turned into SIGINT by the terminal."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child
            try:
                # as a person's terminal starts it: a shell runs background jobs with SIGINT
                # ignored, and Python keeps an ignored SIGINT ignored (no KeyboardInterrupt)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.chdir(REPO)
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.seen = ""  # everything printed so far
        self.pos = 0  # where the next expect starts looking

    def expect(self, pattern: str, timeout: float = 10) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            match = re.compile(pattern).search(self.seen, self.pos)
            if match:
                self.pos = match.end()
                return match
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                raise AssertionError(f"did not see {pattern!r}; the terminal shows:\n{self.seen[self.pos:]}")

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.fd, 4096)
        except OSError:  # the child has gone
            return False
        self.seen += data.decode("utf-8", "replace").replace("\r\n", "\n")
        return bool(data)

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def interrupt_at_prompt(self) -> None:
        """Ctrl-C once the prompt waits for input. Python's readline loop can miss a
        SIGINT that lands between drawing the prompt and waiting for a key (it
        acts on it at the next key), so give it a moment first, as a person would."""
        self.expect(r">>> ")
        time.sleep(0.3)
        self.send("\x03")

    def wait(self, timeout: float = 10) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._read(0.05)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError(f"still running; the terminal shows:\n{self.seen[self.pos:]}")


def terminal(home: Path, *args: str, term: str = "dumb") -> Terminal:
    """`anemll-chat --home HOME ARGS` on a pseudo-terminal; TERM=dumb: no colours."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TERM": term, "HOME": str(home), "LANG": "C.UTF-8"}
    env.pop("NO_COLOR", None)
    env.pop("ANEMLL_HOME", None)
    return Terminal([sys.executable, "-m", "client.cli", "--home", str(home), *args], env)


def test_on_a_terminal_jobs_get_progress_bars_and_states_colours(home):
    with daemon(home, models=[dict(PICO), dict(QWEN_CONVERTING)], jobs=[qwen_job()]):
        jobs = terminal(home, "--jobs", term="xterm-256color")
        assert jobs.wait() == 0
        listing = terminal(home, "--list", term="xterm-256color")
        assert listing.wait() == 0
    assert re.search(r"running\x1b\[0m  quantize  █{8}░{12}  42%", jobs.seen)
    assert "\x1b[32mloaded\x1b[0m" in listing.seen and "\x1b[33mconverting\x1b[0m" in listing.seen


def test_chat_keeps_a_two_turn_conversation_in_one_daemon_session(home):
    with daemon(home, models=[dict(PICO, state="ready")], token_delay=0.01) as d:
        t = terminal(home, "pico")
        t.expect(r"pico: /help for commands")
        t.expect(r">>> ")
        t.send("hello there\r")
        t.expect(r"You said: hello there\n")
        t.expect(r">>> ")
        t.send("/set temperature 0.7\r")
        t.expect(r"temperature = 0.7\n")
        t.send("/stats\r")
        t.expect(r"statistics on\n")
        t.send("and again\r")
        t.expect(r"You said: and again\n")
        t.expect(r"31 prompt tokens, 4 generated, prefill 752.4 tok/s, decode 96.6 tok/s, load 0.00 s\n")
        t.send("/bye\r")
        assert t.wait() == 0
    assert [type(r) for r in d.requests] == [p.Hello, p.Models, p.Load, p.Generate, p.Generate]
    first, second = d.of(p.Generate)
    assert first.session and second.session == first.session
    assert second.messages == ({"role": "user", "content": "hello there"},
                               {"role": "assistant", "content": "You said: hello there"},
                               {"role": "user", "content": "and again"})
    assert (first.temperature, second.temperature) == (None, 0.7)
    assert read_last_model(Settings.load(home=home, env={})) == "pico"


def test_ctrl_c_cancels_the_answer_in_progress_and_returns_to_the_prompt(home):
    long_answer = lambda req: [f" word{i}" for i in range(400)]  # noqa: E731  400 x 20 ms = 8 s
    with daemon(home, reply=long_answer, token_delay=0.02) as d:
        t = terminal(home, "pico")
        t.expect(r">>> ")
        t.send("tell me a long story\r")
        t.expect(r"word5 ")
        t.send("\x03")
        t.expect(r"\(cancelled\)\n")
        assert "word399" not in t.seen
        t.interrupt_at_prompt()  # back at the prompt, Ctrl-C is the prompt's again
        t.expect(r"\(Ctrl-D or /bye to quit\)")
        t.send("/clear\r")
        t.expect("conversation cleared")
        t.send("\x04")  # Ctrl-D quits
        assert t.wait() == 0
    (gen,) = d.of(p.Generate)
    (cancel,) = d.of(p.Cancel)
    assert cancel.target == gen.id and d.cancelled == [gen.id]


def test_ctrl_c_at_the_prompt_does_not_quit(home):
    with daemon(home):
        t = terminal(home, "pico")
        t.interrupt_at_prompt()
        t.expect(r"\(Ctrl-D or /bye to quit\)")
        t.expect(r">>> ")
        t.send("/help\r")
        t.expect(r"/system \[TEXT\]")
        t.send("/bye\r")
        assert t.wait() == 0
