"""Several control-plane replicas behind one httpx client (``MESH_CONTROL_PLANE=https://a:7400,https://b:7400``).

Requests stay on one replica while it answers, so a long-poll's index and a heartbeat's secret keep their meaning;
when it refuses the connection, drops it, or answers 502/503/504, the same request goes to the next one at once.
Every replica serves the same state (rules versions and registry indexes come from the shared store), so a
client that moves carries on where it was. The start is picked at random: instances spread over the replicas.

The choice is plain code (``ReplicaSet``); the two transports around it, sync and async, only do the I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx

from .randomness import randrange
from .settings import split_urls

#: Answers that say "this replica cannot serve now" (a proxy in front with no backend, a replica whose store is
#: down): the request goes to the next replica.
FAILOVER_STATUS = frozenset({502, 503, 504})


def start_index(count: int) -> int:
    """The replica a new client starts on: at random, so that instances spread over the replicas."""
    return randrange(count)


class ReplicaSet:
    """Which replica the next request goes to, and where it goes after a failure (no I/O)."""

    def __init__(self, urls: Sequence[str], start: int | None = None) -> None:
        if not urls:
            raise ValueError("no control-plane URL")
        self.urls = tuple(u.rstrip("/") for u in urls)
        self.origins = tuple(httpx.URL(u) for u in self.urls)
        self.current = (start_index(len(self.urls)) if start is None else start) % len(self.urls)
        #: How often a request moved to another replica (for tests, logs and ``meshctl status``).
        self.failovers = 0

    def __str__(self) -> str:
        return ", ".join(self.urls)

    def order(self) -> list[int]:
        """The replicas to try, the current one first."""
        n = len(self.origins)
        return [(self.current + k) % n for k in range(n)]

    def point(self, request: httpx.Request, index: int) -> None:
        """Send ``request`` to replica ``index`` (its path and query kept: every replica has the same path, which
        ``settings.control_plane_urls`` makes sure of)."""
        origin = self.origins[index]
        url = request.url
        if (url.scheme, url.host, url.port) != (origin.scheme, origin.host, origin.port):
            request.url = url.copy_with(scheme=origin.scheme, host=origin.host, port=origin.port)
            request.headers["host"] = origin.netloc.decode("ascii")

    def failed(self, index: int) -> None:
        if self.current == index:
            self.current = (index + 1) % len(self.origins)
            self.failovers += 1


def _unreachable(exc: httpx.TransportError, tried: list[str], request: httpx.Request) -> httpx.TransportError:
    """The last failure, of its own class (callers catch ``httpx.ConnectError`` and friends), naming every replica
    that was tried."""
    return type(exc)(f"every control-plane replica failed ({'; '.join(tried)})", request=request)


class ReplicaTransport(httpx.BaseTransport):
    def __init__(self, replicas: ReplicaSet, inner: httpx.BaseTransport) -> None:
        self.replicas = replicas
        self._inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        replicas = self.replicas
        order = replicas.order()
        tried: list[str] = []
        for n, index in enumerate(order):
            replicas.point(request, index)
            try:
                response = self._inner.handle_request(request)
            except httpx.TransportError as exc:
                replicas.failed(index)
                tried.append(f"{replicas.urls[index]}: {exc or type(exc).__name__}")
                if n == len(order) - 1:
                    raise _unreachable(exc, tried, request) from exc
                continue
            if response.status_code in FAILOVER_STATUS and n < len(order) - 1:
                response.close()
                replicas.failed(index)
                tried.append(f"{replicas.urls[index]}: {response.status_code}")
                continue
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        self._inner.close()


class AsyncReplicaTransport(httpx.AsyncBaseTransport):
    def __init__(self, replicas: ReplicaSet, inner: httpx.AsyncBaseTransport) -> None:
        self.replicas = replicas
        self._inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        replicas = self.replicas
        order = replicas.order()
        tried: list[str] = []
        for n, index in enumerate(order):
            replicas.point(request, index)
            try:
                response = await self._inner.handle_async_request(request)
            except httpx.TransportError as exc:
                replicas.failed(index)
                tried.append(f"{replicas.urls[index]}: {exc or type(exc).__name__}")
                if n == len(order) - 1:
                    raise _unreachable(exc, tried, request) from exc
                continue
            if response.status_code in FAILOVER_STATUS and n < len(order) - 1:
                await response.aclose()
                replicas.failed(index)
                tried.append(f"{replicas.urls[index]}: {response.status_code}")
                continue
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    async def aclose(self) -> None:
        await self._inner.aclose()


def _split(urls: str | Sequence[str]) -> tuple[str, ...]:
    return split_urls(urls) if isinstance(urls, str) else tuple(u.rstrip("/") for u in urls)


def replica_client(
    urls: str | Sequence[str],
    *,
    verify: Any = True,
    limits: httpx.Limits | None = None,
    replicas: ReplicaSet | None = None,
    **kwargs: Any,
) -> httpx.Client:
    """An ``httpx.Client`` whose base URL is the control plane: one URL as before, several with failover.
    ``replicas`` shares one choice between clients (registration and watch move together)."""
    listed = _split(urls)
    limits = limits or httpx.Limits()
    if len(listed) == 1 and replicas is None:
        return httpx.Client(base_url=listed[0], verify=verify, limits=limits, **kwargs)
    chosen = replicas or ReplicaSet(listed)
    inner = httpx.HTTPTransport(verify=verify, limits=limits)
    return httpx.Client(base_url=chosen.urls[chosen.current], transport=ReplicaTransport(chosen, inner), **kwargs)


def async_replica_client(
    urls: str | Sequence[str],
    *,
    verify: Any = True,
    limits: httpx.Limits | None = None,
    replicas: ReplicaSet | None = None,
    **kwargs: Any,
) -> httpx.AsyncClient:
    """``replica_client`` for asyncio."""
    listed = _split(urls)
    limits = limits or httpx.Limits()
    if len(listed) == 1 and replicas is None:
        return httpx.AsyncClient(base_url=listed[0], verify=verify, limits=limits, **kwargs)
    chosen = replicas or ReplicaSet(listed)
    inner = httpx.AsyncHTTPTransport(verify=verify, limits=limits)
    return httpx.AsyncClient(
        base_url=chosen.urls[chosen.current], transport=AsyncReplicaTransport(chosen, inner), **kwargs
    )
