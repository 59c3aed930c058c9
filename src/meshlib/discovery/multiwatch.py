"""One watch for every service a process calls: a single long-poll on the registry's multiplexed endpoint
(``POST /v1/registry/watch``), on one connection and one thread, whatever the number of services (xDS's aggregated
stream, over HTTP). A per-service long-poll would cost a thread and a connection each, and starve at a hundred.

A newly watched service does not wait for the poll in flight: adding a name asks the registry to answer that poll
now (``POST /v1/registry/watch/wake``, on the caller's side connection; cancelling an httpx request mid-flight can
leave httpcore's pool slot taken), then the loop fetches the new names at once (index 0) and polls again for the
whole set. Consul's rules
for blocking-query clients apply: an index that goes backwards starts over from 0, answers are rate-limited, and
errors back off exponentially with jitter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
import threading
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from ..endpoints import EndpointSet, SnapshotError, parse_snapshot
from ..randomness import uniform
from ..replicas import ReplicaSet, async_replica_client
from ..wire import bounded_json, error_text

log = logging.getLogger("meshlib.discovery.registry")


class WatchError(Exception):
    """Why the multiplexed watch failed, as one readable line."""


class MultiWatch:
    def __init__(
        self,
        base_url: str | ReplicaSet,
        headers: Mapping[str, str],
        verify: ssl.SSLContext | bool,
        wait: float,
        on_snapshot: Callable[[EndpointSet], None],
        on_error: Callable[[str, BaseException], None],
        wake: Callable[[str], None],
        *,
        min_interval: float = 0.05,
        max_backoff: float = 30.0,
    ) -> None:
        self.base_url = base_url
        self.headers = dict(headers)
        self.verify = verify
        self.wait = wait
        self._on_snapshot = on_snapshot
        self._on_error = on_error
        self._wake = wake
        #: Names this watch to the registry, so that it can be asked to answer early.
        self.session = secrets.token_urlsafe(16)
        self._polling = False
        self.min_interval = min_interval
        self.max_backoff = max_backoff
        self.names: set[str] = set()
        self.index = 0
        self.requests = 0
        self.errors = 0
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poll: asyncio.Future[Any] | None = None
        self._stopped = False

    # -- from any thread ----------------------------------------------------------------------------

    def add(self, name: str) -> None:
        """Watch ``name`` too; its first answer comes at once, not after the poll in flight."""
        with self._lock:
            if name in self.names or name in self._pending or self._stopped:
                return
            self._pending.add(name)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="meshlib-registry-watch", daemon=True)
                self._thread.start()
            loop = self._loop
            polling = self._polling
        if polling:
            try:
                self._wake(self.session)
            except Exception as exc:  # the poll then answers at its wait: slower, still correct
                log.debug("waking the registry watch failed: %s", exc)
        if loop is not None:
            loop.call_soon_threadsafe(self._interrupt)

    def remove(self, name: str) -> None:
        with self._lock:
            self.names.discard(name)
            self._pending.discard(name)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            loop = self._loop
            polling = self._polling
        if polling:  # let the poll in flight end now rather than at its wait
            with contextlib.suppress(Exception):
                self._wake(self.session)
        if loop is not None:
            loop.call_soon_threadsafe(self._interrupt)

    # -- the watch thread ---------------------------------------------------------------------------

    def _interrupt(self) -> None:
        """End a sleep early (never an HTTP request: the registry is asked to answer those)."""
        if self._poll is not None and not self._poll.done():
            self._poll.cancel()

    def _run(self) -> None:
        asyncio.run(self._main())

    def _client(self) -> httpx.AsyncClient:
        target = self.base_url
        return async_replica_client(
            target.urls if isinstance(target, ReplicaSet) else target,
            replicas=target if isinstance(target, ReplicaSet) else None,
            headers=self.headers,
            verify=self.verify,
            trust_env=False,
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            timeout=httpx.Timeout(5.0, read=self.wait * 17 / 16 + 5),
        )

    async def _main(self) -> None:
        with self._lock:
            self._loop = asyncio.get_running_loop()
        self._http = self._client()
        try:
            await self._watch()
        finally:
            await self._client_closed(self._http)

    @staticmethod
    async def _client_closed(client: httpx.AsyncClient) -> None:
        with contextlib.suppress(Exception):
            await client.aclose()

    async def _watch(self) -> None:
        failures = 0
        while not self._stopped:
            with self._lock:
                new, self._pending = self._pending, set()
                self.names |= new
                names = sorted(self.names)
            try:
                if new:  # first answers for new names at once, then the long poll for the whole set
                    await self._exchange(self._http, sorted(new), 0, None)
                    new = set()
                await self._exchange(self._http, names, self.index, self.wait)
            except Exception as exc:  # the loop outlives anything the registry (or a handler) throws at it
                failures += 1
                self.errors += 1
                delay = min(self.max_backoff, 0.2 * 2 ** min(failures - 1, 16))
                delay = delay / 2 + uniform() * delay / 2
                level = logging.WARNING if failures in (1, 5) or failures % 50 == 0 else logging.DEBUG
                reason = error_text(exc, len(names))
                log.log(level, "registry watch of %d service(s): %s (retrying in %.1fs)", len(names), reason, delay)
                for name in names:
                    self._on_error(name, WatchError(reason))
                with self._lock:  # names never answered are fetched again first
                    self._pending |= {n for n in new if n in self.names}
                await self._sleep(delay)
                continue
            failures = 0
            with self._lock:
                waiting = bool(self._pending)
            if not waiting:  # the rate limit is for answers; a newly watched name is fetched at once
                await self._sleep(self.min_interval)

    async def _sleep(self, seconds: float) -> None:
        """Sleep; an added name or stop() ends it early (the loop then looks at why)."""
        self._poll = asyncio.ensure_future(asyncio.sleep(seconds))
        try:
            await self._poll
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # type: ignore[union-attr]  # cancelled itself: pass it on
                raise

    async def _exchange(self, client: httpx.AsyncClient, names: list[str], index: int, wait: float | None) -> None:
        if not names:
            await self._sleep(self.wait)  # nothing to watch yet: wait for a name (add() interrupts)
            return
        params: dict[str, str | int] = {"index": index}
        if wait is not None:
            params["wait"] = f"{wait:g}s"
            params["session"] = self.session
        with self._lock:
            if wait is not None and self._pending:  # a name came in since the loop looked: fetch it first
                return
            # from here on an add() wakes this poll (the registry keeps a wake that arrives before the poll)
            self._polling = wait is not None
        self.requests += 1
        try:
            response = await client.post("/v1/registry/watch", params=params, json={"services": names})
        finally:
            with self._lock:
                self._polling = False
        response.raise_for_status()
        body = bounded_json(response)
        new_index = body.get("index") if isinstance(body, dict) else None
        services = body.get("services") if isinstance(body, dict) else None
        if isinstance(new_index, bool) or not isinstance(new_index, int) or new_index < 0:
            raise SnapshotError("the answer has no valid index")
        if not isinstance(services, dict):
            raise SnapshotError("the answer has no services object")
        for name, answer in services.items():
            if name not in self.names:
                continue
            try:
                snapshot = parse_snapshot(name, answer, int(answer.get("index", 0)) if isinstance(answer, dict) else 0)
            except (SnapshotError, TypeError, ValueError) as exc:
                self._on_error(name, exc)
                continue
            self._on_snapshot(snapshot)
        if wait is not None:  # the long poll's index; an index that went backwards starts over
            self.index = 0 if new_index < self.index else max(new_index, 1)
