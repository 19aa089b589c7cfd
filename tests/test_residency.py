"""Residency: loads once, runs one request at a time per model, unloads by the
rule (pinned stay; others after keep_alive; over the memory budget the idle
model that expires soonest goes first). Driven in-process with a fake engine
whose sizes and timings the tests choose; the server tests reuse the fakes."""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path

import pytest

from anemlld.registry import Registry
from anemlld.residency import Residency
from anemlld.runtime.engine import Done, Session, Stats, Token
from anemlld.runtime.prefix_cache import reusable
from anemlld.runtime.sampling import SamplingParams
from shared.errors import AnemllError
from shared.settings import Settings


class FakeEngine:
    """Deterministic tokens ("<model>:<prompt>:<i> ") with a small sleep each,
    so streams can be interleaved, queued and cancelled on purpose. A prompt's
    words are its tokens (of a chat, the last message's), and a session keeps
    the prompt, so the prefix cache works on it as on the real engine's.
    "boom" fails while generating; "refuse" is refused as it is encoded."""

    ctx = 64

    def __init__(self, name: str, delay: float = 0.005):
        self.name, self.delay = name, delay
        self.sampling_defaults: dict = {}
        self.state_bytes: int | None = None
        self.cancelled = threading.Event()
        self.active = 0
        self.max_active = 0
        self.sessions: list[Session] = []  # every state it made, in order
        self._count = threading.Lock()
        self._words: dict[str, int] = {}

    def new_session(self) -> Session:
        self.sessions.append(Session(state=None))
        return self.sessions[-1]

    def encode(self, prompt=None, messages=None) -> list[int]:
        text = prompt if prompt is not None else messages[-1]["content"]
        if text == "refuse":
            raise AnemllError("this model has no chat template", "send a plain prompt", code="bad_request")
        return [self._words.setdefault(word, len(self._words)) for word in text.split()]

    def generate(self, prompt=None, messages=None, params=None, session=None, cancel=None, *, ids=None):
        params = params or SamplingParams()
        ids = self.encode(prompt, messages) if ids is None else ids
        words = {i: w for w, i in self._words.items()}
        text = " ".join(words[i] for i in ids)
        if text == "boom":
            raise RuntimeError("the fake engine exploded")
        with self._count:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            cached = 0
            if session is not None:
                cached = max(0, reusable(session.tokens, ids))
                session.tokens = list(ids)
            pieces, reason = [], "length"
            t0 = time.perf_counter()
            for i in range(params.max_tokens):
                if cancel is not None and cancel.is_set():
                    reason = "cancelled"
                    self.cancelled.set()
                    break
                time.sleep(self.delay)
                piece = f"{self.name}:{text}:{i} "
                pieces.append(piece)
                yield Token(piece, [i])
            ms = (time.perf_counter() - t0) * 1000
            yield Done("".join(pieces), list(range(len(pieces))),
                       Stats(prompt_tokens=len(ids), cached_tokens=cached, completion_tokens=len(pieces),
                             prefill_tokens=len(ids) - cached, decode_ms=ms, done_reason=reason,
                             tokens_per_s=len(pieces) / (ms / 1000) if ms else 0.0))
        finally:
            with self._count:
                self.active -= 1


class FakeLoader:
    """Counts loads; can be slow, fail, and report progress per part."""

    def __init__(self, delay: float = 0.0, token_delay: float = 0.005):
        self.delay, self.token_delay = delay, token_delay
        self.calls: list[str] = []
        self.fail: set[str] = set()
        self.engines: dict[str, FakeEngine] = {}
        self._lock = threading.Lock()

    def __call__(self, entry, progress=None):
        with self._lock:
            self.calls.append(entry.name)
        for i, part in enumerate(("embeddings", "FFN_chunk_01of01", "lm_head")):
            if progress:
                progress(part, (i + 1) / 4)
            time.sleep(self.delay / 3)
        if entry.name in self.fail:
            raise OSError(f"{entry.path}/meta.yaml is unreadable")
        engine = self.engines[entry.name] = FakeEngine(entry.name, self.token_delay)
        return engine


def make_registry(tmp_path: Path, sizes: dict[str, int], **extra) -> Registry:
    registry = Registry()
    for name, size in sizes.items():
        folder = tmp_path / "models" / name
        folder.mkdir(parents=True, exist_ok=True)
        registry.upsert(name, state="ready", path=str(folder), size_bytes=size, **extra.get(name, {}))
    return registry


def make_settings(tmp_path: Path, **changes) -> Settings:
    return dataclasses.replace(Settings.load(home=tmp_path / "home"), **changes)


def wait_for(condition, timeout: float = 3.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


class Recorder:
    """run/fail callbacks for submit that remember what happened."""

    def __init__(self, prompt: str = "hi", max_tokens: int = 3, gate: threading.Event | None = None):
        self.prompt, self.max_tokens, self.gate = prompt, max_tokens, gate
        self.done = threading.Event()
        self.started = threading.Event()
        self.texts: list[str] = []
        self.load_ms: float | None = None
        self.error: AnemllError | None = None

    def run(self, model, load_ms):
        self.started.set()
        self.load_ms = load_ms
        if self.gate is not None:
            self.gate.wait(5)
        for event in model.generate(prompt=self.prompt, options={"max_tokens": self.max_tokens}):
            if isinstance(event, Token):
                self.texts.append(event.text)
        self.done.set()

    def fail(self, error):
        self.error = error
        self.done.set()


@pytest.fixture
def make(tmp_path):
    made: list[Residency] = []

    def build(sizes=None, loader=None, extra=None, **settings_changes):
        settings_changes.setdefault("memory_budget", 0)
        settings = make_settings(tmp_path, **settings_changes)
        registry = make_registry(tmp_path, sizes or {"a": 10}, **(extra or {}))
        residency = Residency(settings, registry, loader or FakeLoader())
        made.append(residency)
        return residency, registry

    yield build
    for residency in made:
        residency.stop()


def test_concurrent_first_acquires_load_the_model_once(make):
    loader = FakeLoader(delay=0.2)
    residency, registry = make(loader=loader)
    got, errors = [], []

    def acquire():
        try:
            got.append(residency.acquire("a"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=acquire) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert loader.calls == ["a"]
    assert len({id(m) for m in got}) == 1 and got[0].engine is loader.engines["a"]
    assert registry.get("a").state == "loaded"


def test_concurrent_first_requests_queue_behind_one_load_and_only_the_first_counts_it(make):
    loader = FakeLoader(delay=0.15)
    residency, _ = make(loader=loader, queue_limit=4)
    recs = [Recorder() for _ in range(3)]
    for rec in recs:
        residency.submit("a", rec.run, rec.fail)
    for rec in recs:
        assert rec.done.wait(5)
    assert loader.calls == ["a"]
    assert recs[0].load_ms >= 100 and recs[1].load_ms == recs[2].load_ms == 0.0
    assert loader.engines["a"].max_active == 1  # one at a time


def test_a_load_reports_progress_from_start_through_each_part_to_the_end(make):
    residency, _ = make()
    seen = []
    residency.acquire("a", on_progress=lambda part, fraction: seen.append((part, fraction)))
    assert seen[0] == ("", 0.0) and seen[-1] == ("", 1.0)
    assert [part for part, _ in seen[1:-1]] == ["embeddings", "FFN_chunk_01of01", "lm_head"]
    assert [f for _, f in seen] == sorted(f for _, f in seen)


def test_a_failed_load_says_model_failed_keeps_the_model_ready_and_can_be_retried(make):
    loader = FakeLoader(delay=0.1)
    loader.fail.add("a")
    residency, registry = make(loader=loader)
    queued = Recorder()
    residency.submit("a", queued.run, queued.fail)
    with pytest.raises(AnemllError) as info:
        residency.acquire("a")
    assert info.value.code == "model_failed" and "meta.yaml is unreadable" in info.value.message
    assert queued.done.wait(2) and queued.error.code == "model_failed" and not queued.texts
    assert registry.get("a").state == "ready" and residency.ps() == []
    loader.fail.clear()
    assert residency.acquire("a").engine is loader.engines["a"]
    assert loader.calls == ["a", "a"]


def test_models_that_cannot_be_served_are_refused_with_their_reason(make):
    residency, registry = make(sizes={"a": 10})
    registry.upsert("conv", state="converting")
    registry.upsert("bad", state="failed", error={"code": "bad_input", "stage": "plan",
                                                  "message": "shard 2 is missing", "hint": "copy it"})
    codes = {}
    for name in ("nope", "conv", "bad"):
        with pytest.raises(AnemllError) as info:
            residency.acquire(name)
        codes[name] = (info.value.code, info.value.message)
    assert codes["nope"][0] == "not_found"
    assert codes["conv"][0] == "not_found" and "converting" in codes["conv"][1]
    assert codes["bad"] == ("model_failed", "model 'bad' failed: shard 2 is missing")


def test_requests_past_the_queue_limit_are_busy_and_a_withdrawn_one_frees_its_place(make):
    residency, _ = make(queue_limit=1)
    gate = threading.Event()
    first, second, third = Recorder(gate=gate), Recorder(), Recorder()
    residency.submit("a", first.run, first.fail)
    assert first.started.wait(2)
    ticket = residency.submit("a", second.run, second.fail)
    with pytest.raises(AnemllError) as info:
        residency.submit("a", third.run, third.fail)
    assert info.value.code == "busy"
    assert ticket.withdraw() and not ticket.withdraw()
    residency.submit("a", third.run, third.fail)
    gate.set()
    assert first.done.wait(2) and third.done.wait(2)
    assert not second.started.is_set()


def test_keep_alive_0_unloads_right_after_the_request(make):
    residency, registry = make()
    rec = Recorder()
    residency.submit("a", rec.run, rec.fail, keep_alive=0)
    assert rec.done.wait(2)
    wait_for(lambda: residency.ps() == [], what="unload")
    assert registry.get("a").state == "ready"


def test_the_reaper_unloads_a_model_once_its_keep_alive_runs_out(make):
    residency, registry = make(keep_alive=0.5)
    residency.acquire("a")
    [ps] = residency.ps()
    assert ps["expires_at"] == pytest.approx(time.time() + 0.5, abs=0.1)
    time.sleep(0.1)
    assert residency.is_loaded("a")
    wait_for(lambda: not residency.is_loaded("a"), timeout=2, what="expiry")
    assert registry.get("a").state == "ready"


def test_over_the_memory_budget_the_idle_model_that_expires_soonest_goes_first(make):
    residency, _ = make(sizes={"a": 40, "b": 40, "c": 40, "d": 40}, memory_budget=100)
    residency.acquire("a", keep_alive=100)
    residency.acquire("b", keep_alive=10)  # expires before a, though loaded after it
    residency.acquire("c", keep_alive=1000)
    assert [m["name"] for m in residency.ps()] == ["a", "c"]
    residency.acquire("d", keep_alive=1000)
    assert [m["name"] for m in residency.ps()] == ["c", "d"]


def test_a_busy_model_is_not_evicted_even_when_it_expires_first(make):
    residency, _ = make(sizes={"a": 40, "b": 40, "c": 40}, memory_budget=100)
    gate = threading.Event()
    busy = Recorder(gate=gate)
    residency.submit("a", busy.run, busy.fail, keep_alive=1)
    assert busy.started.wait(2)
    residency.acquire("b", keep_alive=100)
    residency.acquire("c", keep_alive=100)
    assert [m["name"] for m in residency.ps()] == ["a", "c"]
    gate.set()
    assert busy.done.wait(2)


def test_pinned_models_are_never_evicted_and_a_model_over_budget_loads_anyway_with_a_warning(make, caplog):
    residency, _ = make(sizes={"a": 60, "b": 60}, extra={"a": {"pin": True}}, memory_budget=100, keep_alive=0.05)
    residency.acquire("a")
    time.sleep(0.2)  # far past keep_alive: a pinned model does not expire
    with caplog.at_level(logging.WARNING, logger="anemlld.residency"):
        residency.acquire("b", keep_alive=100)
    assert any("over the memory budget" in r.getMessage() for r in caplog.records)
    ps = {m["name"]: m for m in residency.ps()}
    assert set(ps) == {"a", "b"}
    assert ps["a"]["pinned"] and ps["a"]["expires_at"] is None and ps["a"]["context_length"] == 64
    assert not ps["b"]["pinned"] and ps["b"]["size_bytes"] == 60


def test_the_pin_op_keeps_a_model_and_unload_unpins_it(make):
    residency, registry = make(keep_alive=0.05)
    residency.pin("a")
    time.sleep(0.2)
    assert residency.ps()[0]["pinned"]
    residency.pin("a", False)
    wait_for(lambda: not residency.is_loaded("a"), what="expiry after unpin")
    residency.pin("a")
    assert residency.unload("a") and residency.ps() == [] and registry.get("a").state == "ready"
    assert not residency.unload("a")


def test_ps_counts_requests_and_size_falls_back_to_the_folder(make, tmp_path):
    residency, registry = make(sizes={"a": 10})
    folder = Path(registry.get("a").path)
    (folder / "weights.bin").write_bytes(b"x" * 1234)
    registry.upsert("a", size_bytes=None)
    for _ in range(2):
        rec = Recorder()
        residency.submit("a", rec.run, rec.fail)
        assert rec.done.wait(2)
    [ps] = residency.ps()
    assert ps["requests"] == 2 and ps["size_bytes"] == 1234 and ps["name"] == "a"


def answer(model, prompt: str, options=None, **kw) -> Done:
    """Run one request on ``model`` here (the test is its only user); the Done."""
    *_, done = model.generate(prompt=prompt, options={"max_tokens": 1} if options is None else options, **kw)
    return done


def test_any_request_reuses_the_longest_prefix_any_earlier_one_left_with_or_without_a_session(make):
    residency, _ = make()
    model = residency.acquire("a")
    assert answer(model, "once upon a time").stats.cached_tokens == 0
    assert answer(model, "the end").stats.cached_tokens == 0
    second = answer(model, "once upon a hill", session_id="s1")
    assert (second.stats.cached_tokens, second.stats.prefill_tokens) == (3, 1)
    assert answer(model, "the end is near").stats.cached_tokens == 2
    assert model.cache_count == 2 and len(model.engine.sessions) == 2  # states reused, none made on a hit


def test_the_prefix_cache_keeps_at_most_its_count_least_recently_used_out_first(make):
    residency, _ = make(prefix_cache_states=2)
    model = residency.acquire("a")
    for prompt in ("red fox", "blue sky", "green tea"):
        answer(model, prompt)
    assert model.cache_count == 2
    assert len(model.engine.sessions) == 2  # full: the third overwrote the stalest state instead of a new one
    assert answer(model, "red fox").stats.cached_tokens == 0  # the oldest went
    assert answer(model, "green tea").stats.cached_tokens == 1


def test_the_prefix_cache_keeps_at_most_its_bytes(make):
    loader = FakeLoader()
    residency, _ = make(loader=loader, prefix_cache_bytes=250)
    model = residency.acquire("a")
    loader.engines["a"].state_bytes = 100  # as if the layout said so: room for two
    for prompt in ("red fox", "blue sky", "green tea"):
        answer(model, prompt)
    assert model.cache_count == 2
    assert answer(model, "red fox").stats.cached_tokens == 0


def test_a_prefix_cache_of_0_states_gives_every_request_a_fresh_state(make):
    residency, _ = make(prefix_cache_states=0)
    model = residency.acquire("a")
    for _ in range(3):
        assert answer(model, "once upon", session_id="s1").stats.cached_tokens == 0
    assert model.cache_count == 0 and len(model.engine.sessions) == 3


def test_a_request_that_fails_drops_its_state_and_the_next_one_starts_clean(make):
    residency, _ = make()
    model = residency.acquire("a")
    answer(model, "once upon")
    with pytest.raises(RuntimeError, match="exploded"):
        answer(model, "boom")
    assert model.cache_count == 1
    with pytest.raises(AnemllError):  # refused before any state is taken
        answer(model, "refuse")
    assert model.cache_count == 1 and answer(model, "once upon").stats.cached_tokens == 1


def test_unloading_drops_the_prefix_cache(make):
    residency, _ = make()
    model = residency.acquire("a")
    answer(model, "once upon")
    assert model.cache_count == 1
    residency.unload("a")
    assert model.cache_count == 0


def test_options_override_the_models_defaults_and_invalid_ones_are_bad_requests(make):
    loader = FakeLoader(token_delay=0)
    residency, _ = make(loader=loader)
    model = residency.acquire("a")
    loader.engines["a"].sampling_defaults = {"max_tokens": 2, "temperature": 0.0}
    assert answer(model, "hi", options={}).stats.completion_tokens == 2
    assert answer(model, "hi", options={"max_tokens": 4, "seed": None}).stats.completion_tokens == 4
    for bad in ({"temperature": -1}, {"presence_penalty": 3}, {"top_k": "many"}, {"beam_width": 2}):
        with pytest.raises(AnemllError) as info:
            answer(model, "hi", options=bad)
        assert info.value.code == "bad_request", bad


def test_a_pinned_model_that_becomes_ready_is_loaded_and_preload_loads_pinned_ones(make):
    loader = FakeLoader()
    residency, registry = make(sizes={"a": 10, "b": 10}, loader=loader, extra={"a": {"pin": True}})
    residency.preload_pinned(wait=True)
    assert loader.calls == ["a"]
    registry.upsert("late", state="converting", pin=True, path=registry.get("b").path, size_bytes=5)
    registry.upsert("late", state="ready")
    wait_for(lambda: residency.is_loaded("late"), what="pinned model loaded once ready")
    assert sorted(loader.calls) == ["a", "late"]
