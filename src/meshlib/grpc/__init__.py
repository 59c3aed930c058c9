"""gRPC through the mesh: drop-in channels for generated stubs, and a server side with the same guarantees.

    channel = meshlib.grpc.insecure_channel("payments")   # instead of grpc.insecure_channel("10.0.0.7:50051")
    stub = payments_pb2_grpc.PaymentsStub(channel)        # unchanged

``meshlib.grpc.aio`` has the same for ``grpc.aio``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

try:
    import grpc as _grpc
except ImportError:  # pragma: no cover - depends on the install
    raise ImportError("meshlib.grpc needs grpcio: pip install 'meshlib[grpc]'") from None

from ..errors import ConfigurationError
from ..runtime import Runtime
from .channel import Channel
from .facade import with_compression
from .inbound import server_credentials
from .server import MeshServerInterceptor, Server, server
from .status import MeshRpcError

__all__ = [
    "Channel",
    "MeshRpcError",
    "MeshServerInterceptor",
    "Server",
    "aio",
    "insecure_channel",
    "secure_channel",
    "server",
    "server_credentials",
]


def insecure_channel(
    service: str,
    options: Sequence[tuple[str, Any]] | None = None,
    compression: Any = None,
    *,
    mesh: Runtime | None = None,
) -> Channel:
    """``grpc.insecure_channel`` for a mesh service. "Insecure" means the application brings no credentials: the
    mesh still decides, so with ``MESH_TLS`` on every hop is mTLS with the server's identity verified."""
    return Channel(service, mesh=mesh, options=with_compression(options, compression))


def secure_channel(
    service: str,
    credentials: _grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] | None = None,
    compression: Any = None,
    *,
    mesh: Runtime | None = None,
) -> Channel:
    """``grpc.secure_channel`` for a mesh service: ``credentials=None`` means the mesh's own mTLS identity (which
    needs ``MESH_TLS`` on); given credentials are used as they are, for every endpoint."""
    channel = Channel(service, mesh=mesh, options=with_compression(options, compression), credentials=credentials)
    if credentials is None and channel.mesh.identity is None:
        raise ConfigurationError(
            f"meshlib.grpc.secure_channel({service!r}) without credentials uses the mesh identity, and this process "
            "has none: set MESH_TLS=strict or permissive (with MESH_BOOTSTRAP_TOKEN), or pass credentials="
        )
    return channel


# ``meshlib.grpc.aio`` after ``import meshlib.grpc``, as ``grpc.aio`` after ``import grpc``
from . import aio  # noqa: E402
