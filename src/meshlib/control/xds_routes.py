"""The xDS side's HTTP routes: each connected node's accepted and refused versions, and the bootstrap a
proxyless gRPC client (or ``meshctl xds bootstrap``) needs to reach the ADS port. Both answer 404 when the
control plane runs without ``--xds-port``."""

from __future__ import annotations

import ipaddress
import secrets
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..settings import validate_service_name
from .requests import error
from .xds_names import OUTBOUND, XDS_CLUSTER

if TYPE_CHECKING:
    from .app import ControlPlane


def grpc_bootstrap(service: str, server_uri: str) -> dict[str, object]:
    """gRPC's xDS bootstrap (``GRPC_XDS_BOOTSTRAP``) for an instance of ``service``: one ADS server, plaintext,
    xDS v3; the node names its service as its cluster."""
    return {
        "xds_servers": [
            {"server_uri": server_uri, "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}
        ],
        "node": _node(service),
        # an xDS-enabled gRPC server (grpc.server(..., xds=True)) asks for its listener under this name
        "server_listener_resource_name_template": "grpc/server?xds.resource.listening_address=%s",
    }


#: Where an Envoy sidecar listens for its app's outbound calls, and its admin page, unless asked otherwise.
ENVOY_LISTEN = 15001
ENVOY_ADMIN = 15000


HCM_FILTER = "envoy.filters.network.http_connection_manager"
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def _socket(address: str, port: int) -> dict[str, object]:
    return {"socket_address": {"address": address, "port_value": port}}


def _node(service: str) -> dict[str, object]:
    return {
        "id": f"{service}~{secrets.token_hex(4)}",
        "cluster": service,
        "locality": {},
        "metadata": {"mesh.service": service},
    }


def envoy_bootstrap(service: str, xds_host: str, xds_port: int, listen: int, admin: int) -> dict[str, object]:
    """An Envoy sidecar's bootstrap for an instance of ``service``: its app calls ``http://127.0.0.1:<listen>`` with
    ``Host: <service>``; routes (``mesh-outbound``: every service), clusters and endpoints come over ADS from the
    control plane. The listener itself is static (Envoy's listeners need an address, the mesh's are per client)."""
    ads = {"ads": {}, "resource_api_version": "V3"}
    manager = {
        "@type": _HCM,
        "stat_prefix": "mesh_outbound",
        "rds": {"route_config_name": OUTBOUND, "config_source": ads},
        "http_filters": [
            {
                "name": "envoy.filters.http.fault",  # configured per service, on its virtual host
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"},
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    http2 = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    try:
        ipaddress.ip_address(xds_host)
        discovery = "STATIC"
    except ValueError:
        discovery = "STRICT_DNS"
    return {
        "node": _node(service),
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}],
            },
            "cds_config": ads,
        },
        "static_resources": {
            "listeners": [
                {
                    "name": OUTBOUND,
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                    "filter_chains": [
                        {
                            "filters": [
                                {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": XDS_CLUSTER,
                    "type": discovery,
                    "connect_timeout": "5s",
                    "typed_extension_protocol_options": http2,
                    "load_assignment": {
                        "cluster_name": XDS_CLUSTER,
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {"socket_address": {"address": xds_host, "port_value": xds_port}}
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
        },
    }


def _port(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ValueError(f"{name}: expected a port from 1 to 65535, got {raw[:20]!r}")
    return int(raw)


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
            if cp.xds.mtls:
                return error(400, "an Envoy sidecar cannot join an mTLS xDS port yet: serve xDS without --tls")
            try:
                listen, admin = _port(request, "listen", ENVOY_LISTEN), _port(request, "admin", ENVOY_ADMIN)
            except ValueError as exc:
                return error(400, str(exc))
            return JSONResponse(envoy_bootstrap(service, host, cp.xds.port, listen, admin))
        server_uri = f"[{host}]:{cp.xds.port}" if ":" in host else f"{host}:{cp.xds.port}"
        answer = grpc_bootstrap(service, server_uri)
        if cp.xds.mtls:  # the client's own certificate files complete it (meshctl xds bootstrap --identity-dir)
            answer["xds_servers"][0]["channel_creds"] = [{"type": "tls", "config": {}}]  # type: ignore[index]
        return JSONResponse(answer)

    return [
        Route("/v1/xds/clients", clients, methods=["GET"]),
        Route("/v1/xds/bootstrap", bootstrap, methods=["GET"]),
    ]
