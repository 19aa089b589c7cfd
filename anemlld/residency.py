"""What is in memory: the one owner of resident models. Requests ask it for a
model; nobody else loads or unloads one (Ollama's scheduler is the model).

The rule, read aloud:

    A pinned model stays. Any other model stays for its keep_alive after its
    last request (forever for -1, not at all for 0). When loading a model
    would take the resident models over the memory budget, idle unpinned
    models are unloaded, the one that expires soonest first. If that is still
    not enough, the model is loaded anyway and a warning is logged.

Loading over the budget rather than refusing is a choice: the budget is an
estimate (sizes on disk), and a model that does not fit it next to pinned or
busy ones must still be servable; refusing would make it unusable until
something else is unloaded by hand.

Processes. Each resident model runs in a worker process of its own
(anemlld/worker.py): a crash in native code costs the requests on that
model, and unloading gives its memory back. Tests pass a loader that returns
an in-process engine instead; everything below is the same for both.

Crashes, read aloud:

    A worker that dies ends the request it was running with ``model_failed``
    ("model 'pico' stopped (killed by signal 9) and will be reloaded on the
    next request"); requests queued behind it load the model again, and so
    does the next one. A model whose worker dies 3 times within 10 minutes is
    marked ``failed`` with the reason, until someone ``load``s it.

Memory. The budget counts each loaded worker's measured memory (``ps``'s
``memory_bytes``) and, for a model still to load, its size on disk.

Threads. Each resident model has one thread: it loads the model, then
runs the model's requests one at a time from a bounded queue
(``settings.queue_limit`` requests may wait behind the running one; more are
refused with ``busy``) until the model is unloaded. Concurrent first requests
therefore load a model once: the others wait in its queue. A reaper thread unloads
models whose keep_alive has run out. One lock guards every table here; the
registry and callers' callbacks are never called while holding it.

Each resident model also keeps the KV states of its past requests for prefix
reuse (anemlld/runtime/prefix_cache.py has its rule), within
``settings.prefix_cache_states`` and ``settings.prefix_cache_bytes``; they go
when the model goes.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from anemlld import layout
from anemlld.listeners import Listeners
from anemlld.worker import WorkerDied
from anemlld.registry import ModelEntry, Registry
from anemlld.runtime.prefix_cache import PrefixCache
from anemlld.runtime.sampling import SamplingParams
from anemlld.runtime.tools import Structure, template_messages
from shared.errors import AnemllError
from shared.settings import Settings, format_duration

if TYPE_CHECKING:
    from anemlld.runtime.engine import Done, Token

log = logging.getLogger(__name__)

SERVABLE = ("ready", "loaded")
SAMPLING_OPTIONS = frozenset(f.name for f in dataclasses.fields(SamplingParams))

CRASH_LIMIT = 3  # worker deaths within CRASH_WINDOW_S that mark a model failed
CRASH_WINDOW_S = 600.0

ProgressFn = Callable[[str, float], None]  # (part, fraction 0..1) while a model loads
Loader = Callable[..., Any]  # loader(entry) or loader(entry, progress=ProgressFn) -> engine


def engine_loader(entry: ModelEntry, progress: Any = None) -> Any:
    """The engine in this process (tests, benchmarks); the daemon's models run in workers."""
    from anemlld.runtime.engine import Engine  # torch and friends only when a model is loaded

    return Engine(entry.path, progress=progress)


def new_prefix_cache(engine: Any, states: int, size: int) -> PrefixCache:
    return PrefixCache(engine.new_session, states, size, getattr(engine, "state_bytes", None))


def run_request(engine: Any, cache: PrefixCache, *, prompt: str | None, messages: list[dict] | None,
                options: Mapping[str, Any] | None, session_id: str | None,
                cancel: threading.Event | None, structure: Mapping[str, Any] | None = None
                ) -> Iterator[Token | Done]:
    """One request on an engine in this process: sampling params = engine.sampling_defaults
    overlaid with ``options``; the KV state from ``cache``, and back into it afterwards
    (dropped on an exception). ``structure`` holds the request's format, tools and
    tool_choice (anemlld.runtime.tools.Structure). Raises AnemllError(code="bad_request")
    for an invalid option combination (SamplingParams' BadInput) or a schema or tool list
    the model cannot honour."""
    params = sampling_params(getattr(engine, "sampling_defaults", {}), options or {})
    plan = Structure.of(engine.tokenizer, engine.eos, dict(structure), params.max_tokens) if structure \
        else Structure()
    if messages is not None and structure:
        messages = template_messages(messages)
    ids = engine.encode(prompt, messages, tools=plan.tools) if plan.tools else engine.encode(prompt, messages)
    session = cache.take(ids, session_id)
    # An exception (or the consumer closing us) skips the put: the state may
    # hold half a request, and a fresh one costs only a prefill.
    guided = {"guide": plan.guide} if plan.guide is not None else {}
    yield from plan.stream(engine.generate(ids=ids, params=params, session=session, cancel=cancel, **guided))
    cache.put(session, session_id)



@dataclass
class _Work:
    """One request waiting for, or running on, a model's worker."""

    run: Callable[["ResidentModel", float], None]  # (model, load_ms this request waited for)
    fail: Callable[[AnemllError], None]  # the request could not run (load failed, daemon stopping)
    keep_alive: float | None
    caused_load: bool = False


class ResidentModel:
    """A model in memory (or being loaded) and its thread's queue. ``engine``
    (an in-process engine or a worker.Worker), the prefix cache and ``load_ms``
    are for the code running on its thread."""

    def __init__(self, entry: ModelEntry, size_bytes: int, pinned: bool, keep_alive: float,
                 lock: threading.Lock, cache_states: int = 8, cache_bytes: int = 2 << 30):
        self.name = entry.name
        self.entry = entry
        self.size_bytes = size_bytes
        self.pinned = pinned
        self.keep_alive = keep_alive
        self.engine: Any = None
        self.load_ms = 0.0
        self.requests = 0
        self.last_used = time.monotonic()
        self.state = "loading"  # loading -> loaded -> unloaded
        self.error: AnemllError | None = None
        self.ready = threading.Event()  # set when loaded or failed
        self.queue: deque[_Work] = deque()
        self.running: _Work | None = None
        self.wakeup = threading.Condition(lock)
        self.progress_listeners: list[ProgressFn] = []
        self.thread: threading.Thread | None = None
        self._cache_bounds = (cache_states, cache_bytes)
        self._cache: PrefixCache | None = None  # made with the first request, dropped with the engine
        self.on_death: Callable[["ResidentModel", WorkerDied], AnemllError] | None = None  # residency's count
        self.death_seen = False  # this engine's death was counted already

    # -- on the model's thread -------------------------------------------------
    def generate(self, *, prompt: str | None = None, messages: list[dict] | None = None,
                 options: Mapping[str, Any] | None = None, session_id: str | None = None,
                 cancel: threading.Event | None = None, structure: Mapping[str, Any] | None = None
                 ) -> Iterator[Token | Done]:
        """Run one request on this model (``run_request``, in its worker when it has one).
        ``options`` keys: max_tokens, temperature, top_k, top_p, repetition_penalty,
        presence_penalty, frequency_penalty, seed, stop (tuple of str). A worker that dies
        meanwhile raises AnemllError(code="model_failed") saying what happens next."""
        engine = self.engine
        if not hasattr(engine, "request"):
            yield from run_request(engine, self._prefix_cache(), prompt=prompt, messages=messages,
                                   options=options, session_id=session_id, cancel=cancel, structure=structure)
            return
        try:
            yield from engine.request(prompt=prompt, messages=messages, options=options, session_id=session_id,
                                      cancel=cancel, structure=structure)
        except WorkerDied as e:
            raise self.on_death(self, e) if self.on_death is not None else e from None

    def memory(self) -> int:
        """What the budget counts: the worker's measured memory once loaded, else the size on disk."""
        measured = self.engine.memory_bytes() if self.state == "loaded" and hasattr(self.engine, "memory_bytes") \
            else None
        return measured if measured else self.size_bytes

    @property
    def cache_count(self) -> int:
        """KV states the prefix cache holds."""
        return len(self._cache) if self._cache is not None else 0

    def _prefix_cache(self) -> PrefixCache:
        if self._cache is None:
            self._cache = new_prefix_cache(self.engine, *self._cache_bounds)
        return self._cache

    # -- policy (read under the residency lock) --------------------------------
    @property
    def idle(self) -> bool:
        return self.state == "loaded" and self.running is None and not self.queue

    def deadline(self) -> float:
        """Monotonic time after which an idle model may go; inf if never."""
        if self.pinned or math.isinf(self.keep_alive):
            return math.inf
        return self.last_used + self.keep_alive

    def expires_at(self) -> float | None:
        """The deadline as Unix time, None if never."""
        deadline = self.deadline()
        if math.isinf(deadline):
            return None
        if not self.idle:  # the clock starts when the last request ends
            return time.time() + self.keep_alive
        return time.time() + (deadline - time.monotonic())


class Ticket:
    """A submitted request; ``withdraw`` takes it back while it is still queued."""

    def __init__(self, residency: "Residency", model: ResidentModel, work: _Work):
        self._residency, self._model, self._work = residency, model, work

    def withdraw(self) -> bool:
        """True if the request was still waiting and will now never run."""
        with self._residency._lock:
            try:
                self._model.queue.remove(self._work)
            except ValueError:
                return False
            self._residency._changed.notify_all()
            return True


class Residency:
    def __init__(self, settings: Settings, registry: Registry, loader: Loader | None = None):
        """``loader``: None for a worker process per model; tests pass one returning an in-process engine."""
        self.settings = settings
        self.registry = registry
        if loader is None:
            from anemlld import worker

            loader = functools.partial(worker.spawn, settings)
        self.loader = loader
        self._deaths: dict[str, deque[float]] = {}  # monotonic times each model's workers died
        self._loader_takes_progress = _takes_progress(loader)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # wakes the reaper
        self._models: dict[str, ResidentModel] = {}
        self._pin_override: dict[str, bool] = {}  # the `pin` op and `unload`, until restart
        self._progress_listeners: Listeners[Callable[[str, str, float], None]] = Listeners()
        self._stopped = False
        self._unsubscribe = registry.subscribe(self._on_registry_change)
        self._reaper = threading.Thread(target=self._reap, name="residency-reaper", daemon=True)
        self._reaper.start()

    # -- requests -------------------------------------------------------------
    def submit(self, name: str, run: Callable[[ResidentModel, float], None], fail: Callable[[AnemllError], None],
               *, keep_alive: float | None = None, on_progress: ProgressFn | None = None) -> Ticket:
        """Queue ``run(model, load_ms)`` on the model's worker, loading the model
        first if needed. Raises ``busy`` when the queue is full, ``not_found`` or
        ``model_failed`` when the model cannot be served. ``fail`` is called
        instead of ``run`` if the model does not load."""
        entry = self._servable(name)
        size = self._size_of(entry)
        work = _Work(run, fail, keep_alive)
        with self._lock:
            model = self._models.get(name)
            if model is not None and len(model.queue) + (1 if model.running else 0) > self.settings.queue_limit:
                raise AnemllError(f"model {name!r} is busy: {self.settings.queue_limit} requests are already "
                                  "waiting behind the running one", "try again in a moment, or raise "
                                  "queue_limit in the daemon's settings.toml", code="busy")
            model, created, victims = self._resident(entry, size, keep_alive)
            work.caused_load = created
            if on_progress is not None and model.state == "loading":
                model.progress_listeners.append(on_progress)
            model.queue.append(work)
            model.wakeup.notify()
        self._unload_all(victims)
        return Ticket(self, model, work)

    def acquire(self, name: str, on_progress: ProgressFn | None = None,
                keep_alive: float | None = None) -> ResidentModel:
        """The model, loaded (waiting for a load under way rather than starting
        another). Raises ``not_found`` / ``model_failed`` like ``submit``."""
        entry = self._servable(name)
        size = self._size_of(entry)
        with self._lock:
            model, _created, victims = self._resident(entry, size, keep_alive)
            if on_progress is not None and model.state == "loading":
                model.progress_listeners.append(on_progress)
        self._unload_all(victims)
        model.ready.wait()
        if model.error is not None:
            raise model.error
        with self._lock:
            model.keep_alive = self._keep_alive(model.entry, keep_alive)
            if model.idle:
                model.last_used = time.monotonic()
            self._changed.notify_all()
        return model

    # -- operations ------------------------------------------------------------
    def ps(self) -> list[dict[str, Any]]:
        """The loaded models, shaped as the `ps` reply (docs/protocol.md)."""
        with self._lock:
            models = sorted((m for m in self._models.values() if m.state == "loaded"), key=lambda m: m.name)
            return [{"name": m.name, "size_bytes": m.size_bytes, "pinned": m.pinned,
                     "expires_at": m.expires_at(), "requests": m.requests,
                     "context_length": getattr(m.engine, "ctx", None), "pid": getattr(m.engine, "pid", None),
                     "memory_bytes": m.engine.memory_bytes() if hasattr(m.engine, "memory_bytes") else None}
                    for m in models]

    def is_loaded(self, name: str) -> bool:
        with self._lock:
            model = self._models.get(name)
            return model is not None and model.state == "loaded"

    def forgive(self, name: str) -> bool:
        """A model marked failed because its worker kept dying is servable again
        (the `load` op); True if it was. Failed conversions stay failed."""
        entry = self.registry.get(name)
        error = (entry.error or {}) if entry is not None else {}
        if entry is None or entry.state != "failed" or error.get("stage") != "worker" or not entry.path:
            return False
        with self._lock:
            self._deaths.pop(name, None)
        self.registry.upsert(name, state="ready", error=None)
        log.info("%s may be loaded again (it had been marked failed: %s)", name, error.get("message"))
        return True

    def unload(self, name: str) -> bool:
        """Unpin ``name`` and unload it now if idle, else as soon as its queue
        drains. False if it was not resident."""
        with self._lock:
            self._pin_override[name] = False
            model = self._models.get(name)
            if model is None:
                return False
            model.pinned = False
            model.keep_alive = 0.0
            model.last_used = time.monotonic()
            victims = [model] if model.idle else []
            for victim in victims:
                self._remove(victim)
            self._changed.notify_all()
        self._unload_all(victims, "unloaded on request")
        return True

    def pin(self, name: str, pinned: bool = True, on_progress: ProgressFn | None = None) -> None:
        """Pin (loading if needed) or unpin ``name`` until the daemon restarts."""
        with self._lock:
            self._pin_override[name] = pinned
            model = self._models.get(name)
            if model is not None:
                model.pinned = pinned
                if not pinned:
                    model.last_used = time.monotonic()
            self._changed.notify_all()
        if pinned:
            self.acquire(name, on_progress)

    def preload_pinned(self, wait: bool = False) -> threading.Thread:
        """Load every pinned, converted model, one after the other, in a thread."""
        names = [e.name for e in self.registry.all() if e.pin and e.state in SERVABLE]
        thread = threading.Thread(target=self._preload, args=(names,), name="residency-preload", daemon=True)
        thread.start()
        if wait:
            thread.join()
        return thread

    def listen(self, listener: Callable[[str, str, float], None]) -> Callable[[], None]:
        """Hear every load's progress as (model, part, fraction); returns the unsubscribe."""
        return self._progress_listeners.add(listener)

    def stop(self, timeout: float = 5.0) -> None:
        """Unload everything. Running requests are left to finish (the server
        cancels them first); queued ones fail with ``busy``."""
        self._unsubscribe()
        with self._lock:
            self._stopped = True
            models = list(self._models.values())
            for model in models:
                self._remove(model)
            self._changed.notify_all()
        end = time.monotonic() + timeout
        for model in models:
            if model.thread is not None and model.thread is not threading.current_thread():
                model.thread.join(max(0.0, end - time.monotonic()))
        self._unload_all(models, "daemon stopping")
        self._reaper.join(max(0.0, end - time.monotonic()))

    # -- the table (callers hold the lock) ---------------------------------------
    def _resident(self, entry: ModelEntry, size: int, keep_alive: float | None
                  ) -> tuple[ResidentModel, bool, list[ResidentModel]]:
        """The resident model for ``entry``, starting its load if there is none
        (then ``created``), and the models to unload to make room for it
        (already out of the table)."""
        if self._stopped:
            raise AnemllError("the daemon is stopping", "try again when it is back", code="busy")
        model = self._models.get(entry.name)
        if model is not None:
            return model, False, []
        victims = self._make_room(size, entry.name)
        pinned = self._pin_override.get(entry.name, entry.pin)
        model = ResidentModel(entry, size, pinned, self._keep_alive(entry, keep_alive), self._lock,
                              self.settings.prefix_cache_states, self.settings.prefix_cache_bytes)
        model.on_death = self._count_death
        model.thread = threading.Thread(target=self._worker, args=(model,), name=f"model-{entry.name}",
                                        daemon=True)
        self._models[entry.name] = model
        model.thread.start()
        return model, True, victims

    def _make_room(self, size: int, name: str) -> list[ResidentModel]:
        """The rule: idle unpinned models, soonest expiry first, until ``size`` fits."""
        budget = self.settings.memory_budget
        used = sum(m.memory() for m in self._models.values())
        victims = []
        candidates = sorted((m for m in self._models.values() if m.idle and not m.pinned),
                            key=lambda m: (m.deadline(), m.last_used))
        for model in candidates:
            if not budget or used + size <= budget:
                break
            victims.append(model)
            used -= model.memory()
            self._remove(model)
        if budget and used + size > budget:
            log.warning("loading %s (%s) goes over the memory budget of %s: %s are resident and pinned or busy",
                        name, _mb(size), _mb(budget), _mb(used))
        return victims

    def _remove(self, model: ResidentModel) -> None:
        """Out of the table; its worker ends after its current request."""
        if self._models.get(model.name) is model:
            del self._models[model.name]
        model.state = "unloaded" if model.state == "loaded" else model.state
        model.wakeup.notify_all()

    def _keep_alive(self, entry: ModelEntry, requested: float | None) -> float:
        for value in (requested, entry.keep_alive):
            if value is not None:
                return value
        return self.settings.keep_alive

    # -- outside the lock ---------------------------------------------------------
    def _servable(self, name: str) -> ModelEntry:
        entry = self.registry.get(name)
        if entry is None:
            known = ", ".join(e.name for e in self.registry.all()) or "none yet"
            raise AnemllError(f"no model named {name!r}", f"models: {known}", code="not_found")
        if entry.state == "failed":
            raise self._servable_error(entry)
        if entry.state not in SERVABLE or not entry.path:
            raise AnemllError(f"model {name!r} is {entry.state}, not converted yet",
                              "follow it with `watch` or `jobs` and ask again once it is ready", code="not_found")
        return entry

    @staticmethod
    def _servable_error(entry: ModelEntry) -> AnemllError:
        """Why a failed model cannot be served."""
        message = (entry.error or {}).get("message", "it failed to convert")
        return AnemllError(f"model {entry.name!r} failed: {message}", (entry.error or {}).get("hint", ""),
                           code="model_failed")

    def _size_of(self, entry: ModelEntry) -> int:
        if entry.size_bytes is not None:
            return int(entry.size_bytes)
        with self._lock:
            model = self._models.get(entry.name)
            if model is not None:
                return model.size_bytes
        return layout.folder_size(entry.path)

    def _unload_all(self, models: list[ResidentModel], why: str = "evicted for memory") -> None:
        for model in models:
            self._finish_unload(model, why)

    def _finish_unload(self, model: ResidentModel, why: str) -> None:
        with self._lock:
            if model.engine is None:
                return
            engine, model.engine = model.engine, None
            model._cache = None
            model.state = "unloaded"
            queued = list(model.queue)
            model.queue.clear()
            model.wakeup.notify_all()
        _close(engine)
        log.info("unloaded %s (%s; %d requests served)", model.name, why, model.requests)
        for work in queued:
            _safe_fail(work, AnemllError("the daemon is stopping", "try again when it is back", code="busy"))
        entry = self.registry.get(model.name)
        if entry is not None and entry.state == "loaded" and not self.is_loaded(model.name):
            self.registry.upsert(model.name, state="ready")

    def _worker(self, model: ResidentModel) -> None:
        if not self._load(model):
            return
        while True:
            with self._lock:
                while not model.queue and model.state == "loaded" and _alive(model.engine):
                    model.wakeup.wait()
                if model.state != "loaded":
                    break
                work = None
                if _alive(model.engine):
                    work = model.running = model.queue.popleft()
                    model.requests += 1  # counted as it starts, so `ps` agrees with a client that saw `done`
            if work is None:
                if not self._after_death(model):
                    return
                continue
            load_ms = model.load_ms if work.caused_load else 0.0
            try:
                work.run(model, load_ms)
            except Exception:  # the request's own code reports its errors; this is a bug
                log.exception("request on %s raised", model.name)
            with self._lock:
                model.running = None
                model.last_used = time.monotonic()
                model.keep_alive = self._keep_alive(model.entry, work.keep_alive)
                done_now = model.idle and not model.pinned and model.keep_alive <= 0
                if done_now:
                    self._remove(model)
                self._changed.notify_all()
            if done_now:
                self._finish_unload(model, "keep_alive 0")
                return

    def _load(self, model: ResidentModel) -> bool:
        """Load on the worker; False (and the waiting requests failed) if it did not."""
        t0 = time.perf_counter()
        self._progress(model, "", 0.0)
        try:
            if self._loader_takes_progress:
                engine = self.loader(model.entry, progress=lambda part, f: self._progress(model, part, f))
            else:
                engine = self.loader(model.entry)
        except WorkerDied as e:
            self._abandon(model, self._count_death(model, e))
            return False
        except Exception as e:
            if isinstance(e, AnemllError):
                log.error("loading %s failed: %s", model.name, e)
                message, hint = e.message, e.hint
            else:
                log.exception("loading %s failed", model.name)
                message, hint = f"{type(e).__name__}: {e}", "see the daemon's log; re-convert the model if it persists"
            self._abandon(model, AnemllError(f"model {model.name!r} could not be loaded: {message}", hint,
                                             stage="load", code="model_failed"))
            return False
        load_ms = (time.perf_counter() - t0) * 1000
        with self._lock:
            stopped = self._models.get(model.name) is not model
            if not stopped:
                model.engine, model.load_ms, model.state = engine, load_ms, "loaded"
                model.death_seen = False
                model.last_used = time.monotonic()
                if hasattr(engine, "on_exit"):  # a worker dying while idle wakes the model's thread
                    engine.on_exit = lambda: self._wake(model)
            listeners, model.progress_listeners = model.progress_listeners, []
            self._changed.notify_all()
        if stopped:
            _close(engine)
            self._abandon(model, AnemllError("the daemon is stopping", "try again when it is back", code="busy"))
            return False
        self._progress(model, "", 1.0, listeners)
        log.info("loaded %s in %.0f ms (%s, keep_alive %s%s)", model.name, load_ms, _mb(model.size_bytes),
                 format_duration(model.keep_alive), ", pinned" if model.pinned else "")
        entry = self.registry.get(model.name)
        if entry is not None and entry.state == "ready":
            self.registry.upsert(model.name, state="loaded")
        model.ready.set()
        return True

    # -- workers that die -------------------------------------------------------------
    def _count_death(self, model: ResidentModel, died: WorkerDied) -> AnemllError:
        """Count a worker's death; the error for the request that saw it: ``died``
        itself, or, at the CRASH_LIMIT-th death in CRASH_WINDOW_S, the model marked failed."""
        now = time.monotonic()
        with self._lock:
            model.death_seen = True
            deaths = self._deaths.setdefault(model.name, deque())
            deaths.append(now)
            while now - deaths[0] > CRASH_WINDOW_S:
                deaths.popleft()
            count = len(deaths)
            if count >= CRASH_LIMIT:
                del self._deaths[model.name]
        if count < CRASH_LIMIT:
            return died
        message = (f"its worker stopped {count} times in {CRASH_WINDOW_S / 60:.0f} minutes, "
                   f"the last time {died.reason}")
        hint = "the daemon's log has the details; send `load` for the model to try again"
        log.error("marking %s failed: %s", model.name, message)
        self.registry.upsert(model.name, state="failed",
                             error={"code": "model_failed", "stage": "worker", "message": message, "hint": hint})
        return AnemllError(f"model {model.name!r} failed: {message}", hint, stage="worker", code="model_failed")

    def _after_death(self, model: ResidentModel) -> bool:
        """The model's worker is gone: load the model again for the requests waiting
        (True once loaded), or let it go (False), failing them if it is marked failed."""
        engine = model.engine
        error = None if model.death_seen else self._count_death(model, WorkerDied(model.name, engine.reason))
        entry = self.registry.get(model.name)
        failed = entry is not None and entry.state == "failed"
        with self._lock:
            reload = not failed and bool(model.queue) and self._models.get(model.name) is model
            if reload:
                model.engine, model._cache, model.state = None, None, "loading"
                model.ready.clear()  # `load` and `pin` wait for the new worker
            else:
                self._remove(model)
        if not reload:
            if failed:
                self._abandon(model, error or self._servable_error(entry))
            self._finish_unload(model, f"its worker {engine.reason}")
            return False
        _close(engine)
        log.info("loading %s again for the requests waiting", model.name)
        return self._load(model)

    def _wake(self, model: ResidentModel) -> None:
        with self._lock:
            model.wakeup.notify_all()

    def _abandon(self, model: ResidentModel, error: AnemllError) -> None:
        """A load that failed (or was overtaken by stop): fail everyone waiting for it."""
        with self._lock:
            model.error = error
            self._remove(model)
            model.state = "unloaded"
            queued = list(model.queue)
            model.queue.clear()
            model.progress_listeners = []
            model.ready.set()
            self._changed.notify_all()
        for work in queued:
            _safe_fail(work, error)

    def _progress(self, model: ResidentModel, part: str, fraction: float,
                  listeners: list[ProgressFn] | None = None) -> None:
        with self._lock:
            mine = list(model.progress_listeners if listeners is None else listeners)
            everyone = self._progress_listeners.snapshot()
        for listener in mine:
            try:
                listener(part, fraction)
            except Exception:
                log.exception("load progress listener failed")
        for listener in everyone:
            try:
                listener(model.name, part, fraction)
            except Exception:
                log.exception("load progress listener failed")

    def _reap(self) -> None:
        while True:
            with self._lock:
                if self._stopped:
                    return
                now = time.monotonic()
                expired = [m for m in self._models.values() if m.idle and m.deadline() <= now]
                for model in expired:
                    self._remove(model)
                if not expired:
                    deadlines = [m.deadline() for m in self._models.values() if m.idle]
                    wait = min(deadlines, default=math.inf) - now
                    self._changed.wait(timeout=min(max(wait, 0.005), 60.0))
            self._unload_all(expired, "keep_alive ran out")

    def _preload(self, names: list[str]) -> None:
        for name in names:
            try:
                self.acquire(name)
            except AnemllError as e:
                log.error("could not preload pinned model %s: %s", name, e)
            except Exception:
                log.exception("could not preload pinned model %s", name)

    def _on_registry_change(self, entry: ModelEntry) -> None:
        """A pinned model that becomes ready is loaded; a resident model whose
        folder is being converted again goes as soon as it is idle."""
        with self._lock:
            if self._stopped:
                return
            model = self._models.get(entry.name)
            pinned = self._pin_override.get(entry.name, entry.pin)
            if model is not None and entry.state not in SERVABLE:
                model.pinned = False
                model.keep_alive = 0.0
                self._changed.notify_all()
                return
            start = model is None and pinned and entry.state == "ready" and entry.path
        if start:
            threading.Thread(target=self._preload, args=([entry.name],), name="residency-preload",
                             daemon=True).start()


def _takes_progress(loader: Loader) -> bool:
    try:
        params = inspect.signature(loader).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "progress" or p.kind is p.VAR_KEYWORD for p in params)


def sampling_params(defaults: Mapping[str, Any], options: Mapping[str, Any]) -> SamplingParams:
    """A request's sampling: its options over the model's defaults over SamplingParams'."""
    given = {**defaults, **{k: v for k, v in options.items() if v is not None}}
    if "stop" in given:
        given["stop"] = tuple(given["stop"])
    unknown = sorted(set(given) - SAMPLING_OPTIONS)
    if unknown:
        raise AnemllError(f"unknown sampling option {', '.join(unknown)}",
                          f"use only {', '.join(sorted(SAMPLING_OPTIONS))}", code="bad_request")
    try:
        return SamplingParams(**given)
    except TypeError as e:  # a comparison in the checks met a value of the wrong type
        raise AnemllError(f"a sampling option has the wrong type ({e})", "send numbers for numeric options",
                          code="bad_request") from None


def _alive(engine: Any) -> bool:
    """False for a worker whose process has ended; in-process engines do not die alone."""
    return getattr(engine, "alive", True)


def _close(engine: Any) -> None:
    """End a worker process (an in-process engine just goes with its last reference)."""
    close = getattr(engine, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            log.exception("closing a model's worker failed")


def _safe_fail(work: _Work, error: AnemllError) -> None:
    try:
        work.fail(error)
    except Exception:
        log.exception("could not report a failed request")


def _mb(size: int) -> str:
    return f"{size / (1 << 20):.1f} MB"
