"""The grpc.aio server side: ``meshlib.grpc.aio.server(...)`` and ``AioMeshServerInterceptor`` for a
``grpc.aio.server`` of your own; the async twin of ``server.py``, on the same decisions (``inbound.py``)."""

from __future__ import annotations

import asyncio
import inspect
import signal
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from grpc import aio

from ..discovery.base import Registration
from ..errors import RegistrationRefused
from ..inbound import handling
from ..runtime import Runtime
from ..serving import serving_runtime
from .inbound import admit_or_refuse, code_from_context, finish_rpc, rewrap
from .server import bind, listening_line, registration_for
from .side_port import SidePort


class AioMeshServerInterceptor(aio.ServerInterceptor):  # type: ignore[misc]
    """Mesh admission and telemetry for every call of a ``grpc.aio.server``."""

    def __init__(self, mesh: Runtime) -> None:
        self.mesh = mesh

    async def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        return rewrap(handler, self.mesh, details.method, _unary, _streaming)


def _unary(mesh: Runtime, method: str, behavior: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    async def run(request: Any, context: Any) -> Any:
        adm, refused = admit_or_refuse(mesh, method, context)
        if refused is not None:
            await context.abort(*refused)
        error: BaseException | None = None
        try:
            with handling(adm):
                result = behavior(request, context)
                if inspect.isawaitable(result):
                    result = await result
                return result
        except BaseException as exc:
            error = exc
            raise
        finally:
            finish_rpc(adm, code_from_context(context, error))

    return run


def _streaming(mesh: Runtime, method: str, behavior: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    async def run(request: Any, context: Any) -> AsyncIterator[Any]:
        adm, refused = admit_or_refuse(mesh, method, context)
        if refused is not None:
            await context.abort(*refused)
        error: BaseException | None = None
        try:
            with handling(adm):
                result = behavior(request, context)
                if hasattr(result, "__aiter__"):
                    async for item in result:
                        yield item
                elif inspect.isawaitable(result):  # a handler that writes with context.write()
                    await result
        except BaseException as exc:
            error = exc
            raise
        finally:
            finish_rpc(adm, code_from_context(context, error))

    return run


class AioServer:
    """A ``grpc.aio.Server`` that is a mesh instance; everything else is delegated to the real server."""

    def __init__(
        self,
        server: aio.Server,
        mesh: Runtime,
        registration: Registration,
        port: int,
        host: str,
        drain_delay: float,
        side: SidePort | None = None,
    ) -> None:
        self.server = server
        self.side = side
        self.mesh = mesh
        self.registration = registration
        self.port = port
        self.host = host
        self.drain_delay = drain_delay
        self._stopped = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.server, name)

    async def start(self) -> None:
        await self.server.start()
        if self.side is not None:
            self.side.start()
        try:
            await asyncio.to_thread(self.registration.start)
        except RegistrationRefused:
            await self.server.stop(0)
            if self.side is not None:
                self.side.stop()
            self.mesh.close()
            raise
        print(listening_line(self.mesh, self.host, self.port, self.registration), file=sys.stderr, flush=True)

    async def stop(self, grace: float | None = None) -> None:
        """Deregister first, drain for ``drain_delay``, then stop with ``grace`` for calls in flight."""
        if not self._stopped:
            self._stopped = True
            if self.side is not None:
                self.side.drain()
            await asyncio.to_thread(self.registration.close)
            if self.drain_delay > 0:
                await asyncio.sleep(self.drain_delay)
        await self.server.stop(grace)
        if self.side is not None:
            await asyncio.to_thread(self.side.stop)
        self.mesh.close()

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return bool(await self.server.wait_for_termination(timeout))

    async def serve_forever(self, grace: float = 30.0) -> None:
        """``start()``, then serve until SIGTERM or SIGINT, then ``stop(grace)``."""
        await self.start()
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        try:
            await stopping.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        await self.stop(grace)

    async def __aenter__(self) -> AioServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(None)


def server(
    *,
    service: str | None = None,
    port: int = 50051,
    host: str = "127.0.0.1",
    mesh: Runtime | None = None,
    interceptors: Sequence[Any] = (),
    options: Sequence[tuple[str, Any]] = (),
    tags: Sequence[str] = (),
    meta: Mapping[str, str] | None = None,
    advertise: str | None = None,
    drain_delay: float = 0.5,
    metrics_port: int | None = 0,
) -> AioServer:
    """``meshlib.grpc.server`` for grpc.aio: add servicers, then ``await server.start()`` or
    ``await server.serve_forever()``. Make it inside the running event loop."""
    if mesh is None:
        mesh = serving_runtime(service)
    real = aio.server(interceptors=[AioMeshServerInterceptor(mesh), *interceptors], options=list(options))
    bound = bind(real, mesh, host, port)
    side = SidePort(mesh, host, metrics_port) if metrics_port is not None else None
    registration = registration_for(mesh, host, bound, tags, meta, advertise, side)
    return AioServer(real, mesh, registration, bound, host, drain_delay, side)
