"""The Discovery interface: ``watch(service, listener)`` and snapshots pushed to listeners.

Backends (static, embedded registry, Consul) only have to call ``publish()`` when they learn something; this
class keeps the last snapshot per service, drops pushes that change nothing (so the balancer does not churn),
and lets a first caller wait for the first answer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence

from ..endpoints import EndpointSet, SnapshotError, parse_snapshot, snapshot_to_json
from ..errors import RegistrationRefused
from ..state import StateDir, source_key

Listener = Callable[[EndpointSet], None]
_log = logging.getLogger("meshlib.discovery")


class Discovery:
    def __init__(self, state_dir: str | None = None, source: str = "") -> None:
        self._state = StateDir(state_dir) if state_dir else None
        # last-known endpoints are kept per source: a cache written against another registry is never restored
        self._cache_dir = f"endpoints/{source_key(source)}" if source else "endpoints"
        self._lock = threading.Lock()
        self._current: dict[str, EndpointSet] = {}
        self._listeners: dict[str, list[Listener]] = {}
        self._ready: dict[str, threading.Event] = {}
        self._errors: dict[str, str] = {}

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

    def describe(self) -> str:
        """Where this discovery asks, for error messages ("registry at http://…"); empty when it asks nowhere."""
        return ""

    def known_services(self) -> list[str]:
        """Names discovery knows to have instances (for "did you mean ...?"); backends ask their source."""
        return sorted(name for name, snap in self._current.items() if snap.endpoints)

    def never_registered(self, service: str) -> bool | None:
        """True: the source has never seen ``service``; False: it has (its instances are gone); None: cannot tell."""
        return None

    def last_error(self, service: str) -> str | None:
        """What went wrong the last time discovery was asked about ``service`` (None after a good answer)."""
        return self._errors.get(service)

    def unwatch(self, service: str) -> None:
        """Stop watching ``service`` and forget what was known of it (a later ``watch`` starts afresh)."""
        with self._lock:
            self._listeners.pop(service, None)
            self._current.pop(service, None)
            self._ready.pop(service, None)
        self._errors.pop(service, None)
        self._stop_watch(service)

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

    def register(
        self, service: str, address: str, port: int, tags: Sequence[str] = (), meta: Mapping[str, str] | None = None
    ) -> Registration:
        """A registration for this instance (not yet started); backends without a registry return a no-op."""
        return NoRegistration()

    # -- for backends -----------------------------------------------------------------------------

    def _start_watch(self, service: str) -> None:
        """Begin fetching ``service``; call ``publish`` with what is found (an empty set when it is unknown)."""
        raise NotImplementedError

    def _stop_watch(self, service: str) -> None:
        """Stop fetching ``service`` (backends with a watch per service or a watched set override this)."""

    def publish_and_save(self, snapshot: EndpointSet) -> None:
        """Publish; when membership changed, also keep it as the last known endpoints in the state dir."""
        if self.publish(snapshot) and self._state is not None:
            self._state.save(f"{self._cache_dir}/{snapshot.service}.json", snapshot_to_json(snapshot))

    def discovery_failed(self, service: str, source: str, exc: BaseException) -> None:
        """A watch failed (unreachable, bad answer): remember why for error messages, and fall back on the last
        endpoints saved on disk. Never raises: the watch loop must go on whatever happens here."""
        try:
            self._errors[service] = f"{source}: {exc}"[:500]
            self.restore_saved(service, source)
        except Exception:  # an error while handling an error must not end the watch
            _log.exception("discovery of %s: handling a failure failed", service)

    def restore_saved(self, service: str, source: str) -> None:
        """Discovery is down and has never answered for ``service``: serve what the last run saw, not nothing."""
        if self.current(service) is None and self._state is not None:
            saved = self._state.load(f"{self._cache_dir}/{service}.json")
            if saved is None:
                return
            try:
                snapshot = parse_snapshot(service, saved, 0)
            except SnapshotError as exc:
                _log.warning("ignoring the saved endpoints of %s (%s): %s", service, self._state.path, exc)
                return
            _log.warning("%s unreachable: using the last known endpoints of %s", source, service)
            self.publish(snapshot)

    def publish(self, snapshot: EndpointSet) -> bool:
        """Record a snapshot; notify listeners only when membership changed. Returns whether it changed."""
        service = snapshot.service
        self._errors.pop(service, None)
        with self._lock:
            if service not in self._ready:  # nobody watches it (any more): a late answer must not resurrect it
                return False
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


class Registration:
    """One instance registered in discovery, kept alive by a heartbeat thread until ``close()``, which
    deregisters it. Backends implement ``_register``, ``_heartbeat`` (re-registering when the server forgot the
    instance) and ``_deregister``."""

    ttl = 10.0
    id = ""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.registered = False

    def _register(self) -> None:
        raise NotImplementedError

    def credentials(self) -> dict[str, str]:
        """Headers that prove a request comes from this registered instance (its stats reports carry them)."""
        return {}

    def _heartbeat(self) -> None:
        raise NotImplementedError

    def _deregister(self) -> None:
        raise NotImplementedError

    def start(self) -> Registration:
        """Register now; a refusal that retrying cannot heal (a missing or wrong token) raises at once, anything
        else is retried in the background."""
        try:
            self._register()
            self.registered = True
        except RegistrationRefused:
            raise
        except Exception as exc:
            _log.warning("registration of %s failed (%s); retrying in the background", self.id, exc)
        self._thread = threading.Thread(target=self._loop, name=f"meshlib-heartbeat-{self.id}", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        interval = max(0.2, self.ttl / 3)
        failures = 0 if self.registered else 1  # a failed first registration counts
        while not self._stop.wait(interval):
            try:
                if self.registered:
                    self._heartbeat()
                else:
                    self._register()
                    self.registered = True
            except Exception as exc:
                failures += 1
                _log.warning("heartbeat for %s failed: %s", self.id, exc)
                continue
            if failures:  # said once, so that the warnings above have an end in the log
                _log.warning("%s is registered again, after %d failed attempt(s)", self.id, failures)
                failures = 0

    def close(self) -> None:
        """Stop heartbeating and deregister (best effort: a TTL cleans up whatever this cannot)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        try:
            self._deregister()
        except Exception as exc:
            _log.warning("deregistration of %s failed: %s", self.id, exc)
        self.registered = False


class NoRegistration(Registration):
    """For discovery that has no registry (static lists)."""

    def start(self) -> Registration:
        return self

    def close(self) -> None:
        pass
