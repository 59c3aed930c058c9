"""``meshlib.serve()``: run an ASGI or WSGI app as a mesh instance.

ASGI apps run on uvicorn; WSGI apps run on the same uvicorn through a2wsgi's thread pool (a threaded production
server, and one code path for TLS, health, registration and shutdown). On SIGTERM or SIGINT the instance
deregisters *first*, keeps serving for ``drain_delay`` while clients' watches catch up, then stops accepting and
finishes the requests in flight.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import uvicorn

from .contrib.asgi import MeshMiddleware
from .discovery.base import Registration
from .errors import ConfigurationError, RegistrationRefused
from .runtime import Runtime
from .security.body_buffer import buffered_body
from .security.connection_limits import HEADER_TIMEOUT, MAX_HEADER_BYTES, bounded
from .security.server_tls import sniffing, with_peer_identity
from .serving import advertised_address, placement, serving_runtime

log = logging.getLogger("meshlib.server")
ASGIApp = Callable[..., Any]


def is_asgi(app: Any) -> bool:
    """ASGI apps are async callables of (scope, receive, send); WSGI apps are sync callables of two arguments."""
    if inspect.iscoroutinefunction(app):
        return True
    call = getattr(app, "__call__", None)  # noqa: B004 (we want the bound method, not callable())
    return call is not None and inspect.iscoroutinefunction(call)


def mesh_uvicorn_config(
    app: Any,
    mesh: Runtime,
    *,
    log_level: str = "info",
    lifespan: Literal["auto", "on", "off"] = "auto",
    graceful: float = 30.0,
    max_connections: int = 4096,
    header_timeout: float = HEADER_TIMEOUT,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> uvicorn.Config:
    """A uvicorn Config for ``app`` with the mesh's TLS mode wired in: strict = TLS with client certificates
    required; permissive = TLS and plaintext on one port (first byte sniffed); both put the peer's identity into
    the ASGI scope."""
    identity = mesh.identity
    tls_mode = mesh.settings.tls
    config = uvicorn.Config(
        app,
        log_level=log_level,
        lifespan=lifespan,
        timeout_graceful_shutdown=max(1, round(graceful)),
        access_log=False,
        # one port for TLS and plaintext needs a byte sniffed before any TLS layer: asyncio's own loop
        loop="asyncio" if tls_mode == "permissive" else "auto",
        limit_concurrency=max_connections,
    )
    config.load()
    # bounded headers (size and time) for every mode: a peer cannot hold a connection or memory by sending slowly
    protocol = bounded(config.http_protocol_class, max_header_bytes, header_timeout)
    if identity is None:
        config.http_protocol_class = protocol
    elif tls_mode == "strict":
        config.ssl = identity.server_strict
        config.http_protocol_class = with_peer_identity(protocol)
    else:
        config.ssl = None
        config.http_protocol_class = sniffing(with_peer_identity(protocol), identity.server_permissive, header_timeout)
    return config


def serve(
    app: Any,
    *,
    service: str | None = None,
    port: int = 8000,
    host: str = "127.0.0.1",
    mesh: Runtime | None = None,
    tags: Sequence[str] = (),
    meta: Mapping[str, str] | None = None,
    advertise: str | None = None,
    drain_delay: float = 0.5,
    graceful_timeout: float = 30.0,
    wsgi_workers: int = 32,
    log_level: str = "info",
    on_ready: Callable[[int], None] | None = None,
    max_connections: int = 4096,
    header_timeout: float = HEADER_TIMEOUT,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> None:
    """Run ``app`` (ASGI or WSGI) as an instance of ``service`` until SIGTERM/SIGINT. Blocks.

    ``max_connections`` concurrent connections at most (503 past it); request headers must arrive within
    ``header_timeout`` seconds and fit in ``max_header_bytes`` (431 past it)."""
    if mesh is None:
        mesh = serving_runtime(service)
    if not is_asgi(app):
        from a2wsgi import WSGIMiddleware

        # the body is read on the event loop before a worker thread is taken (slow senders hold no thread)
        app = buffered_body(WSGIMiddleware(app, workers=wsgi_workers))
        lifespan: Literal["auto", "on", "off"] = "off"
    else:
        lifespan = "auto"
    endpoints = MeshMiddleware(app, mesh)

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        mesh.close()
        raise ConfigurationError(
            f"cannot listen on {host}:{port} for {mesh.service}: {exc.strerror or exc} "
            "(is another instance running? pick another port, or 0 for a free one)"
        ) from None
    bound_port = int(sock.getsockname()[1])
    address = advertise or advertised_address(host)
    registration = mesh.discovery.register(
        mesh.service,
        address,
        bound_port,
        tags=tags,
        meta={**placement(mesh.settings.zone, meta), "mesh_tls": mesh.settings.tls},
    )
    if mesh.stats is not None:
        mesh.stats.serving(registration, address, bound_port)

    config = mesh_uvicorn_config(
        endpoints,
        mesh,
        log_level=log_level,
        lifespan=lifespan,
        graceful=graceful_timeout,
        max_connections=max_connections,
        header_timeout=header_timeout,
        max_header_bytes=max_header_bytes,
    )
    server = _MeshServer(config, registration, endpoints, drain_delay, bound_port, on_ready)
    server.host_text = f"[{host}]" if ":" in host else host
    try:
        server.run(sockets=[sock])
    finally:
        if registration.registered:  # a crash in startup: still leave discovery clean
            registration.close()
        mesh.close()
    if server.refused is not None:
        raise server.refused


class _MeshServer(uvicorn.Server):
    """uvicorn.Server with registration after start-up and deregistration before shutdown.

    (uvicorn re-raises SIGTERM after its graceful shutdown, so cleanup must live *inside* the shutdown.)"""

    def __init__(
        self,
        config: uvicorn.Config,
        registration: Registration,
        endpoints: MeshMiddleware,
        drain_delay: float,
        port: int,
        on_ready: Callable[[int], None] | None,
    ) -> None:
        super().__init__(config)
        self.registration = registration
        self.endpoints = endpoints
        self.drain_delay = drain_delay
        self.port = port
        self.on_ready = on_ready
        self.refused: RegistrationRefused | None = None
        self.host_text = "127.0.0.1"

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets=sockets)
        if self.should_exit:
            return
        try:
            await asyncio.to_thread(self.registration.start)
        except RegistrationRefused as exc:  # serving while unregistered would look healthy and get no traffic
            log.error("meshlib: %s", exc)
            self.refused = exc
            self.should_exit = True
            return
        mesh = self.endpoints.mesh
        scheme = "https" if mesh.settings.tls == "strict" else "http"
        where = mesh.discovery.describe() or mesh.settings.discovery
        registered = (
            f"registered as {self.registration.id} in {where}"
            if self.registration.registered
            else ("not registered yet (retrying)" if self.registration.id else "not registered (static discovery)")
        )
        print(
            f"meshlib: {mesh.service} listening on {scheme}://{self.host_text}:{self.port}, "
            f"MESH_TLS={mesh.settings.tls}, {registered}",
            file=sys.stderr,
            flush=True,
        )
        if self.on_ready is not None:
            self.on_ready(self.port)

    async def shutdown(self, sockets: Any = None) -> None:
        self.endpoints.draining = True
        await asyncio.to_thread(self.registration.close)
        log.info("meshlib: deregistered; draining for %.1fs", self.drain_delay)
        await asyncio.sleep(self.drain_delay)
        await super().shutdown(sockets=sockets)
