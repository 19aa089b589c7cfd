"""Every model the daemon knows and the state it is in: the one record the
watcher, the jobs, residency and the server agree on. Thread-safe; listeners
hear every change (the server turns them into ``watch`` events)."""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from anemlld.listeners import Listeners

# queued -> converting -> ready <-> loaded, or -> failed (see shared.protocol.MODEL_STATES)
STATES = ("queued", "converting", "ready", "failed", "loaded")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    state: str
    source: str | None = None          # the Hugging Face folder it came from
    path: str | None = None            # the converted folder (meta.yaml), once there is one
    options: dict[str, Any] = field(default_factory=dict)  # conversion options, sidecar spelling
    size_bytes: int | None = None      # converted size on disk
    error: dict[str, Any] | None = None  # code, stage, message, hint (error.json)
    pin: bool = False
    keep_alive: float | None = None    # seconds; None: the daemon's default; inf: forever

    def to_wire(self) -> dict[str, Any]:
        """The record as `models` and `watch` send it."""
        return {"name": self.name, "state": self.state, "source": self.source, "options": dict(self.options),
                "size_bytes": self.size_bytes, "error": self.error}


Listener = Callable[[ModelEntry], None]


class Registry:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._models: dict[str, ModelEntry] = {}
        self._listeners: Listeners[Listener] = Listeners()

    def get(self, name: str) -> ModelEntry | None:
        with self._lock:
            return self._models.get(name)

    def all(self) -> list[ModelEntry]:
        with self._lock:
            return sorted(self._models.values(), key=lambda m: m.name)

    def upsert(self, name: str, **changes: Any) -> ModelEntry:
        """Create or change a model's record; listeners hear the result."""
        if "state" in changes and changes["state"] not in STATES:
            raise ValueError(f"unknown model state {changes['state']!r}")
        with self._lock:
            old = self._models.get(name)
            entry = dataclasses.replace(old, **changes) if old else ModelEntry(name=name, **changes)
            self._models[name] = entry
        for listener in self._listeners.snapshot():
            listener(entry)
        return entry

    def remove(self, name: str) -> None:
        with self._lock:
            self._models.pop(name, None)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Add a listener; returns the function that removes it."""
        return self._listeners.add(listener)
