"""The sync gRPC server side: ``meshlib.grpc.server(service=..., port=...)``, or ``MeshServerInterceptor`` and
``server_credentials`` for a ``grpc.server`` of your own.

Each call is admitted before its handler runs (mesh deadline and trace context in; identity from the handshake
and authorization from the rules: ``PERMISSION_DENIED`` without running the handler), and recorded after it
(server span with OpenTelemetry's RPC attributes, metrics, access log). Registration as ``meshlib.serve`` does it:
registered once serving, deregistered *first* on stop, then a drain delay, then a graceful stop.
"""

from __future__ import annotations

import concurrent.futures
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grpc

from ..discovery.base import Registration
from ..errors import ConfigurationError, RegistrationRefused
from ..inbound import handling
from ..runtime import Runtime
from ..serving import advertised_address, placement, serving_runtime
from .inbound import admit_or_refuse, advertised_tls, code_from_context, finish_rpc, rewrap, server_credentials
from .side_port import SidePort

log = logging.getLogger("meshlib.grpc")


class MeshServerInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Mesh admission and telemetry for every call of a sync ``grpc.server``."""

    def __init__(self, mesh: Runtime) -> None:
        self.mesh = mesh

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        return rewrap(handler, self.mesh, details.method, _unary, _streaming)


def _unary(mesh: Runtime, method: str, behavior: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def run(request: Any, context: Any) -> Any:
        adm, refused = admit_or_refuse(mesh, method, context)
        if refused is not None:
            context.abort(*refused)
        error: BaseException | None = None
        try:
            with handling(adm):
                return behavior(request, context)
        except BaseException as exc:
            error = exc
            raise
        finally:
            finish_rpc(adm, code_from_context(context, error))

    return run


def _streaming(mesh: Runtime, method: str, behavior: Callable[[Any, Any], Iterator[Any]]) -> Callable[[Any, Any], Any]:
    def run(request: Any, context: Any) -> Iterator[Any]:
        adm, refused = admit_or_refuse(mesh, method, context)
        if refused is not None:
            context.abort(*refused)
        error: BaseException | None = None
        try:
            with handling(adm):
                yield from behavior(request, context)
        except BaseException as exc:
            error = exc
            raise
        finally:
            finish_rpc(adm, code_from_context(context, error))

    return run


class Server:
    """A ``grpc.Server`` that is a mesh instance; everything else is delegated to the real server."""

    def __init__(
        self,
        server: grpc.Server,
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

    def __getattr__(self, name: str) -> Any:  # add_generic_rpc_handlers, add_registered_method_handlers, ...
        return getattr(self.server, name)

    def start(self) -> None:
        """Serve, then register (an instance is listed only once it can answer)."""
        self.server.start()
        if self.side is not None:
            self.side.start()
        try:
            self.registration.start()
        except RegistrationRefused:
            self.server.stop(0)
            if self.side is not None:
                self.side.stop()
            self.mesh.close()
            raise
        print(listening_line(self.mesh, self.host, self.port, self.registration), file=sys.stderr, flush=True)

    def stop(self, grace: float | None = None) -> threading.Event:
        """Deregister first, keep serving for ``drain_delay`` while callers' discovery catches up, then stop
        accepting and give calls in flight ``grace`` seconds."""
        if not self._stopped:
            self._stopped = True
            if self.side is not None:
                self.side.drain()
            self.registration.close()
            if self.drain_delay > 0:
                time.sleep(self.drain_delay)
        event: threading.Event = self.server.stop(grace)
        threading.Thread(target=_close_after, args=(event, self.mesh, self.side), daemon=True).start()
        return event

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return bool(self.server.wait_for_termination(timeout))

    def serve_forever(self, grace: float = 30.0) -> None:
        """``start()``, then block until SIGTERM or SIGINT, then ``stop(grace)``."""
        self.start()
        stopping = threading.Event()

        def on_signal(signum: int, frame: Any) -> None:
            stopping.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while not stopping.wait(0.5):
                pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.stop(grace).wait()

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(None).wait()


def _close_after(event: threading.Event, mesh: Runtime, side: SidePort | None) -> None:
    event.wait()
    if side is not None:
        side.stop()
    mesh.close()


def listening_line(mesh: Runtime, host: str, port: int, registration: Registration) -> str:
    where = mesh.discovery.describe() or mesh.settings.discovery
    registered = (
        f"registered as {registration.id} in {where}"
        if registration.registered
        else ("not registered yet (retrying)" if registration.id else "not registered (static discovery)")
    )
    shown = f"[{host}]" if ":" in host else host
    return f"meshlib: {mesh.service} listening on grpc://{shown}:{port}, MESH_TLS={mesh.settings.tls}, {registered}"


def bind(real: Any, mesh: Runtime, host: str, port: int) -> int:
    """Bind the mesh port on ``real`` (a grpc or grpc.aio server), TLS as the mesh says; an error that says what
    to do when the port is taken."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    credentials = server_credentials(mesh)
    try:
        bound: int = (
            real.add_insecure_port(address) if credentials is None else real.add_secure_port(address, credentials)
        )
    except RuntimeError as exc:
        bound = 0
        error: Exception | None = exc
    else:
        error = None
    if not bound:
        mesh.close()
        raise ConfigurationError(
            f"cannot listen on {address} for {mesh.service} (gRPC): {error or 'port in use'} "
            "(is another instance running? pick another port, or 0 for a free one)"
        )
    return bound


def registration_for(
    mesh: Runtime,
    host: str,
    port: int,
    tags: Sequence[str],
    meta: Mapping[str, str] | None,
    advertise: str | None,
    side: SidePort | None = None,
) -> Registration:
    extra = {"metrics_port": str(side.port)} if side is not None else {}
    address = advertise or advertised_address(host)
    registration = mesh.discovery.register(
        mesh.service,
        address,
        port,
        tags=tags,
        meta={**placement(mesh.settings.zone, meta), "mesh_tls": advertised_tls(mesh), "protocol": "grpc", **extra},
    )
    if mesh.stats is not None:
        mesh.stats.serving(registration, address, port)
    return registration


def server(
    *,
    service: str | None = None,
    port: int = 50051,
    host: str = "127.0.0.1",
    mesh: Runtime | None = None,
    max_workers: int = 16,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    options: Sequence[tuple[str, Any]] = (),
    tags: Sequence[str] = (),
    meta: Mapping[str, str] | None = None,
    advertise: str | None = None,
    drain_delay: float = 0.5,
    metrics_port: int | None = 0,
) -> Server:
    """A gRPC server that is an instance of ``service``: mesh TLS as ``MESH_TLS`` says, mesh admission on every
    call, registered in discovery on ``start()``. Add servicers as to any ``grpc.Server``
    (``add_PaymentsServicer_to_server(servicer, server)``), then ``start()`` or ``serve_forever()``.

    ``/-/mesh/health`` and ``/-/mesh/metrics`` are served over HTTP on ``metrics_port`` (0: a free port, advertised
    in discovery; None: not at all)."""
    if mesh is None:
        mesh = serving_runtime(service)
    real = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"grpc-{mesh.service}"),
        interceptors=[MeshServerInterceptor(mesh), *interceptors],
        options=list(options),
    )
    bound = bind(real, mesh, host, port)
    side = SidePort(mesh, host, metrics_port) if metrics_port is not None else None
    registration = registration_for(mesh, host, bound, tags, meta, advertise, side)
    return Server(real, mesh, registration, bound, host, drain_delay, side)
