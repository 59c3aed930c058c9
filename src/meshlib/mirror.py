"""Traffic mirroring: a route's ``mirror: {subset: v2, percent: 10}`` sends a copy of that share of its requests
to the subset, fire and forget.

The caller never waits for a copy and never sees its result: copies go into a bounded queue (dropped and counted
when it is full, never blocking) and one background event loop per Mesh sends them, at most 64 at a time, each
once (no retries, and without touching the target's breakers or latency estimates), with ``x-mesh-mirror: 1``
(added by the client's call path, which owns every ``x-mesh-*`` header) so the receiving side labels its metrics
and spans as mirrored. Their responses are read and discarded; their outcome is recorded as client metrics under
the route ``mirror:<subset>``, next to the primary's, so a canary can be compared on real traffic before it takes
any.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import TYPE_CHECKING

import httpx

from . import runtime

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger("meshlib.mirror")
#: Copies waiting or in flight at most; more are dropped (and counted), so a slow mirror target costs nothing.
CAPACITY = 512
#: Copies in flight at once, from the one background event loop.
CONCURRENCY = 64
#: A copy's whole budget: a mirror target that hangs is given up on, not waited for.
COPY_TIMEOUT = 5.0
_PHASES = ("connect", "read", "write", "pool")


class MirrorSender:
    def __init__(self, mesh: Runtime, capacity: int = CAPACITY, concurrency: int = CONCURRENCY) -> None:
        self.mesh = mesh
        self.capacity = capacity
        self.concurrency = concurrency
        self._pending = 0  # queued or in flight
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def pending(self) -> int:
        """Copies queued or in flight."""
        return self._pending

    def submit(self, service: str, request: httpx.Request, subset: str) -> None:
        """Queue a copy of ``request`` for ``subset`` of ``service``; never blocks, never raises."""
        if self._closed:
            return
        stream = request.stream
        if not isinstance(stream, httpx.ByteStream):  # a streamed body can be read once, by the primary only
            self._count("skipped", service, subset)
            return
        with self._lock:
            if self._pending >= self.capacity:
                full = True
            else:
                full = False
                self._pending += 1
        if full:
            self._count("dropped", service, subset)
            return
        headers = [(k, v) for k, v in request.headers.raw if not k.lower().startswith(b"x-mesh-")]
        copy = httpx.Request(
            request.method,
            request.url,
            headers=headers,
            content=b"".join(stream),
            extensions={"mesh_mirror": subset, "timeout": dict.fromkeys(_PHASES, COPY_TIMEOUT)},
        )
        loop = self._loop or self._start()
        loop.call_soon_threadsafe(self._spawn, copy)

    def _count(self, what: str, service: str, subset: str) -> None:
        tel = self.mesh.telemetry
        if tel is not None:
            labels = (("mesh.service", self.mesh.service), ("mesh.peer_service", service), ("mesh.subset", subset))
            (tel.metrics.mirror_dropped if what == "dropped" else tel.metrics.mirror_skipped).add(1, labels)

    def _start(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._run, args=(loop,), name="meshlib-mirror", daemon=True)
                self._thread.start()
                self._loop = loop
            return self._loop

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        from .client.async_transport import AsyncMeshTransport

        asyncio.set_event_loop(loop)
        self._transport = AsyncMeshTransport(self.mesh)
        self._slots = asyncio.Semaphore(self.concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._transport.aclose())
            loop.close()

    def _spawn(self, copy: httpx.Request) -> None:
        task = asyncio.get_running_loop().create_task(self._send(copy))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, copy: httpx.Request) -> None:
        try:
            async with self._slots:
                response = await self._transport.handle_async_request(copy)
                await response.aread()
                await response.aclose()
        except Exception as exc:  # recorded by the copy's own client metrics; nothing to hand anyone
            log.debug("mirrored %s %s failed: %s", copy.method, copy.url, exc)
        finally:
            with self._lock:
                self._pending -= 1

    def close(self) -> None:
        self._closed = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)


runtime.HOOKS.mirror = MirrorSender  # the sender every runtime's route mirrors through
