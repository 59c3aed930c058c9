"""The xDS side's HTTP routes: each connected node's accepted and refused versions, and the bootstrap a
proxyless gRPC client (or ``meshctl xds bootstrap``) needs to reach the ADS port. Both answer 404 when the
control plane runs without ``--xds-port``."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..settings import validate_service_name
from .requests import error

if TYPE_CHECKING:
    from .app import ControlPlane


def grpc_bootstrap(service: str, server_uri: str) -> dict[str, object]:
    """gRPC's xDS bootstrap (``GRPC_XDS_BOOTSTRAP``) for an instance of ``service``: one ADS server, plaintext,
    xDS v3; the node names its service as its cluster."""
    return {
        "xds_servers": [
            {"server_uri": server_uri, "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}
        ],
        "node": {
            "id": f"{service}~{secrets.token_hex(4)}",
            "cluster": service,
            "locality": {},
            "metadata": {"mesh.service": service},
        },
    }


def xds_routes(cp: ControlPlane) -> list[Route]:
    def without() -> Response:
        return error(404, "this control plane serves no xDS: start meshctl serve with --xds-port PORT")

    async def clients(request: Request) -> Response:
        if cp.xds is None:
            return without()
        return JSONResponse({"port": cp.xds.port, "clients": cp.xds.clients()})

    async def bootstrap(request: Request) -> Response:
        if cp.xds is None:
            return without()
        service = request.query_params.get("service", "")
        try:
            validate_service_name(service)
        except ValueError as exc:
            return error(400, f"service: {exc} (ask for ?service=NAME, the service this client runs as)")
        host = request.url.hostname or "127.0.0.1"
        server_uri = f"[{host}]:{cp.xds.port}" if ":" in host else f"{host}:{cp.xds.port}"
        return JSONResponse(grpc_bootstrap(service, server_uri))

    return [
        Route("/v1/xds/clients", clients, methods=["GET"]),
        Route("/v1/xds/bootstrap", bootstrap, methods=["GET"]),
    ]
