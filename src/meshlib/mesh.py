"""Mesh: the public façade and the composition root. One per process; it is the runtime (``runtime.py``) every
shell runs on, and the only place that builds clients and gRPC channels on it (the sender of mirrored copies
registers itself with the runtime when the HTTP clients load: ``runtime.HOOKS``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import runtime
from .client.clients import AsyncClient, Client
from .optional import grpc_facades
from .runtime import Runtime

if TYPE_CHECKING:
    import grpc
    from grpc import aio as grpc_aio

__all__ = ["Mesh"]


class Mesh(Runtime):
    """One per process: discovery, the per-service policy state, rules, identity and telemetry (``Runtime``), and
    the clients and channels that call through them (cheap views onto it)."""

    # -- clients ----------------------------------------------------------------------------------

    def client(self, **kwargs: Any) -> Client:
        return Client(mesh=self, **kwargs)

    def async_client(self, **kwargs: Any) -> AsyncClient:
        return AsyncClient(mesh=self, **kwargs)

    def grpc_channel(self, service: str, **kwargs: Any) -> grpc.Channel:
        """A ``grpc.Channel`` to ``service`` for generated stubs (mTLS when mesh TLS is on)."""
        return grpc_facades().sync.Channel(service, mesh=self, **kwargs)

    def grpc_aio_channel(self, service: str, **kwargs: Any) -> grpc_aio.Channel:
        """The same for ``grpc.aio`` stubs."""
        return grpc_facades().aio.AioChannel(service, mesh=self, **kwargs)

    # -- the process default ----------------------------------------------------------------------

    @classmethod
    def default(cls) -> Mesh:
        """The process-wide Mesh built from the environment, for ``meshlib.Client()`` without ``mesh=``."""
        current = runtime.process_default()
        if not isinstance(current, Mesh):
            # made by a shell before this module was loaded (``meshlib.grpc.insecure_channel`` first): the same
            # runtime, given the façade's builders (``Mesh`` adds methods only, never state)
            current.__class__ = Mesh
        assert isinstance(current, Mesh)
        return current

    @classmethod
    def set_default(cls, mesh: Mesh | None) -> None:
        runtime.PROCESS_DEFAULT.set(mesh)

    @classmethod
    def current_default(cls) -> Runtime | None:
        """The process default if one was made (never makes one)."""
        return runtime.PROCESS_DEFAULT.current


runtime.PROCESS_DEFAULT.factory = Mesh
