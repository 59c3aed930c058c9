"""``meshlib.grpc.aio``: the mesh for ``grpc.aio`` — channels for async stubs and an async server side."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from ..errors import ConfigurationError
from ..runtime import Runtime
from .aio_calls import StreamCall, UnaryCall
from .aio_channel import AioChannel
from .aio_server import AioMeshServerInterceptor, AioServer, server
from .facade import with_compression

#: grpc.aio's own names (``meshlib.grpc.aio.Channel`` as ``grpc.aio.Channel``)
Channel = AioChannel
Server = AioServer
MeshServerInterceptor = AioMeshServerInterceptor

__all__ = [
    "Channel",
    "MeshServerInterceptor",
    "Server",
    "StreamCall",
    "UnaryCall",
    "insecure_channel",
    "secure_channel",
    "server",
]


def insecure_channel(
    service: str,
    options: Sequence[tuple[str, Any]] | None = None,
    compression: Any = None,
    *,
    mesh: Runtime | None = None,
) -> AioChannel:
    """``grpc.aio.insecure_channel`` for a mesh service (mTLS all the same when ``MESH_TLS`` is on)."""
    return AioChannel(service, mesh=mesh, options=with_compression(options, compression))


def secure_channel(
    service: str,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] | None = None,
    compression: Any = None,
    *,
    mesh: Runtime | None = None,
) -> AioChannel:
    """``grpc.aio.secure_channel`` for a mesh service; ``credentials=None`` means the mesh's own mTLS identity."""
    channel = AioChannel(service, mesh=mesh, options=with_compression(options, compression), credentials=credentials)
    if credentials is None and channel.mesh.identity is None:
        raise ConfigurationError(
            f"meshlib.grpc.aio.secure_channel({service!r}) without credentials uses the mesh identity, and this "
            "process has none: set MESH_TLS=strict or permissive (with MESH_BOOTSTRAP_TOKEN), or pass credentials="
        )
    return channel
