"""What every server shell shares before it binds (HTTP's ``serve`` and gRPC's, sync and aio), with no server
library imported: the runtime an instance serves with and the address it advertises."""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping

from .endpoints import ZONE_META
from .runtime import PROCESS_DEFAULT, Runtime

log = logging.getLogger("meshlib.server")


def advertised_address(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1"
    return host


def placement(zone: str, meta: Mapping[str, str] | None) -> dict[str, str]:
    """The instance's meta with its zone (``MESH_ZONE``) added, unless the caller's meta names one itself."""
    out = dict(meta or {})
    if zone and ZONE_META not in out:
        out[ZONE_META] = zone
    return out


def serving_runtime(service: str | None) -> Runtime:
    """The Mesh an instance of ``service`` serves with, which is also the process default: ``meshlib.Client()``
    objects bind to the default at their first request, so clients the app made at import carry this name."""
    existing = PROCESS_DEFAULT.current
    if existing is not None and (not service or existing.service == service):
        return existing
    if existing is None:
        mesh = PROCESS_DEFAULT.factory(service=service)
        PROCESS_DEFAULT.set(mesh)
        return mesh
    log.warning(
        "meshlib: this process's default mesh is already named %r (made before serve(service=%r)); calls through "
        "it are labelled, traced and authorized as %r. Call meshlib.serve before using a client, or set "
        "MESH_SERVICE=%s",
        existing.service,
        service,
        existing.service,
        service,
    )
    return PROCESS_DEFAULT.factory(service=service)
