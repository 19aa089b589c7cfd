"""A thread-safe set of callbacks: what the registry, the jobs and residency
use to tell the server about changes."""
from __future__ import annotations

import threading
from typing import Callable, Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Listeners(Generic[F]):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[F] = []

    def add(self, listener: F) -> Callable[[], None]:
        """Add ``listener``; returns the function that removes it."""
        with self._lock:
            self._items.append(listener)

        def remove() -> None:
            with self._lock:
                if listener in self._items:
                    self._items.remove(listener)
        return remove

    def snapshot(self) -> list[F]:
        """The listeners now, to call outside any lock."""
        with self._lock:
            return list(self._items)
