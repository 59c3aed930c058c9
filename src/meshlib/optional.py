"""Heavy optional parts, loaded at their first use rather than at ``import meshlib``: a process that never opens a
gRPC channel never pays for grpcio (about 9 MB of RSS and 70 ms of import). This is laziness, not a way around an
import cycle: the gRPC façades import only what is below them, and ``tests/test_import_contracts.py`` walks
function-level imports too."""

from __future__ import annotations

import functools
from types import ModuleType
from typing import NamedTuple


class GrpcFacades(NamedTuple):
    sync: ModuleType  # meshlib.grpc.channel
    aio: ModuleType  # meshlib.grpc.aio


@functools.cache
def grpc_facades() -> GrpcFacades:
    """The sync and aio gRPC channel façades; a clear error without grpcio (the [grpc] extra)."""
    try:
        import grpc  # noqa: F401
    except ImportError:
        raise ImportError("gRPC channels need grpcio: pip install 'meshlib[grpc]'") from None
    from .grpc import aio, channel

    return GrpcFacades(channel, aio)
