"""The xDS side's HTTP routes: each connected node's accepted and refused versions, and the bootstrap a
proxyless gRPC client (or ``meshctl xds bootstrap``) needs to reach the ADS port. Both answer 404 when the
control plane runs without ``--xds-port``."""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..settings import validate_service_name
from .requests import error
from .xds_bootstraps import (
    ENVOY_ADMIN,
    ENVOY_LISTEN,
    EnvoyIdentity,
    envoy_bootstrap,
    grpc_bootstrap,
    validate_identity_dir,
)

if TYPE_CHECKING:
    from .app import ControlPlane


def _port(request: Request, name: str, default: int | None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ValueError(f"{name}: expected a port from 1 to 65535, got {raw[:20]!r}")
    return int(raw)


def _envoy_identity(request: Request) -> EnvoyIdentity | None:
    """The sidecar's identity directory and inbound side, from the query; ``None`` without ``identity_dir``."""
    directory = request.query_params.get("identity_dir")
    inbound = _port(request, "inbound", None)
    app_port = _port(request, "app_port", None)
    if directory is None:
        if inbound is not None or app_port is not None:
            raise ValueError("inbound and app_port need identity_dir: the inbound side serves mTLS only")
        return None
    directory = validate_identity_dir(directory)
    if (inbound is None) != (app_port is None):
        raise ValueError("inbound and app_port go together: the port callers reach, and the app's own port")
    if inbound is None or app_port is None:
        return EnvoyIdentity(directory)
    address = request.query_params.get("inbound_address", "0.0.0.0")
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"inbound_address: expected an IP address, got {address[:60]!r}") from None
    return EnvoyIdentity(directory, (address, inbound), app_port)


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
        if request.query_params.get("envoy") in ("1", "true"):
            try:
                listen, admin = _port(request, "listen", ENVOY_LISTEN), _port(request, "admin", ENVOY_ADMIN)
                identity = _envoy_identity(request)
            except ValueError as exc:
                return error(400, str(exc))
            if cp.xds.mtls and identity is None:
                return error(
                    400,
                    "this xDS port requires mTLS (meshctl serve --tls): an Envoy sidecar joins it with a mesh "
                    "identity (meshctl xds bootstrap --envoy --identity-dir DIR)",
                )
            assert listen is not None and admin is not None
            answer = envoy_bootstrap(service, host, cp.xds.port, listen, admin, identity, ads_mtls=cp.xds.mtls)
            return JSONResponse(answer)
        server_uri = f"[{host}]:{cp.xds.port}" if ":" in host else f"{host}:{cp.xds.port}"
        answer = grpc_bootstrap(service, server_uri)
        if cp.xds.mtls:  # the client's own certificate files complete it (meshctl xds bootstrap --identity-dir)
            answer["xds_servers"][0]["channel_creds"] = [{"type": "tls", "config": {}}]
        return JSONResponse(answer)

    return [
        Route("/v1/xds/clients", clients, methods=["GET"]),
        Route("/v1/xds/bootstrap", bootstrap, methods=["GET"]),
    ]
