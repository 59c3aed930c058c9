"""The Discovery interface: ``watch(service, listener)`` and snapshots pushed to listeners.

Backends (static, embedded registry, Consul) only have to call ``publish()`` when they learn something; this
class keeps the last snapshot per service, drops pushes that change nothing (so the balancer does not churn),
and lets a first caller wait for the first answer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..endpoints import EndpointSet

Listener = Callable[[EndpointSet], None]


class Discovery:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: dict[str, EndpointSet] = {}
        self._listeners: dict[str, list[Listener]] = {}
        self._ready: dict[str, threading.Event] = {}

    # -- for the mesh -----------------------------------------------------------------------------

    def watch(self, service: str, listener: Listener) -> None:
        """Start watching ``service`` (lazily, on first use) and push every changed snapshot to ``listener``;
        the current snapshot, when there is one, is pushed at once."""
        with self._lock:
            self._listeners.setdefault(service, []).append(listener)
            first = service not in self._ready
            if first:
                self._ready[service] = threading.Event()
            current = self._current.get(service)
        if first:
            self._start_watch(service)
        if current is not None:
            listener(current)

    def current(self, service: str) -> EndpointSet | None:
        return self._current.get(service)

    def wait_ready(self, service: str, timeout: float) -> bool:
        """Block until discovery has answered once for ``service`` (True) or ``timeout`` passed (False)."""
        event = self._ready.get(service)
        return event is not None and event.wait(timeout)

    def is_ready(self, service: str) -> bool:
        event = self._ready.get(service)
        return event is not None and event.is_set()

    def close(self) -> None:
        """Stop background watches. Idempotent."""

    # -- for backends -----------------------------------------------------------------------------

    def _start_watch(self, service: str) -> None:
        """Begin fetching ``service``; call ``publish`` with what is found (an empty set when it is unknown)."""
        raise NotImplementedError

    def publish(self, snapshot: EndpointSet) -> bool:
        """Record a snapshot; notify listeners only when membership changed. Returns whether it changed."""
        service = snapshot.service
        with self._lock:
            previous = self._current.get(service)
            changed = not snapshot.same_members(previous)
            if changed:
                self._current[service] = snapshot
            listeners = list(self._listeners.get(service, ())) if changed else []
            event = self._ready.setdefault(service, threading.Event())
        for listener in listeners:
            listener(snapshot)
        event.set()
        return changed
