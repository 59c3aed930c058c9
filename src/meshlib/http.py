"""The HTTP data plane's public names, kept here for code that imports them from ``meshlib.http``. The parts live
in ``meshlib.client``: host names (``names``), the per-call state (``call``), response streams (``streams``), the
sync and async transports (``transport``, ``async_transport``), the engine (``pools``) and the clients
(``clients``)."""

from __future__ import annotations

from .client.async_transport import AsyncMeshTransport
from .client.clients import AsyncClient, Client
from .client.names import mesh_service_name
from .client.streams import PREFETCH_LIMIT
from .client.transport import MeshTransport

__all__ = ["PREFETCH_LIMIT", "AsyncClient", "AsyncMeshTransport", "Client", "MeshTransport", "mesh_service_name"]
