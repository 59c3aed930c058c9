"""The bootstrap files xDS clients start from (``meshctl xds bootstrap``): gRPC's JSON and an Envoy sidecar's, as
plain dicts (no protos: the HTTP side builds them). Everything else such a client runs on comes over ADS.

An Envoy sidecar with a mesh identity reads its certificate and the mesh roots through SDS from files in its
identity directory (``cert-sds.json``, ``roots-sds.json``, naming ``cert.pem``, ``key.pem`` and ``ca.pem`` there):
Envoy reloads them when they are replaced, so a renewal needs no restart. The clusters the control plane sends it
name the same two secrets, at the paths its node metadata gives (``mesh.identity_dir``)."""

from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass
from typing import Any

from .xds_names import (
    CERT_SECRET,
    IDENTITY_DIR_META,
    INBOUND_APP,
    INBOUND_ROUTES,
    OUTBOUND,
    ROOTS_SECRET,
    SDS_FILES,
    TLS_META,
    XDS_CLUSTER,
)

#: Where an Envoy sidecar listens for its app's outbound calls, and its admin page, unless asked otherwise.
ENVOY_LISTEN = 15001
ENVOY_ADMIN = 15000

_TYPES = "type.googleapis.com/envoy.extensions"
_HCM = f"{_TYPES}.filters.network.http_connection_manager.v3.HttpConnectionManager"
_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def grpc_bootstrap(service: str, server_uri: str) -> dict[str, Any]:
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


@dataclass(frozen=True)
class EnvoyIdentity:
    """An Envoy sidecar's mesh identity: its directory (absolute), and, to be the inbound side of its service, the
    address and port mesh callers reach (mTLS required) and the app's own port on 127.0.0.1."""

    directory: str
    inbound: tuple[str, int] | None = None
    app_port: int | None = None


def _node(service: str) -> dict[str, Any]:
    return {
        "id": f"{service}.{secrets.token_hex(4)}",
        "cluster": service,
        "locality": {},
        "metadata": {"mesh.service": service},
    }


def sds_secret(name: str, directory: str) -> dict[str, Any]:
    """A reference to one of the sidecar's two secrets, read from its SDS file and reloaded when replaced."""
    return {
        "name": name,
        "sds_config": {
            "path_config_source": {"path": f"{directory}/{SDS_FILES[name]}", "watched_directory": {"path": directory}},
            "resource_api_version": "V3",
        },
    }


def sds_files(directory: str) -> dict[str, dict[str, Any]]:
    """The SDS files' contents (file name -> JSON): the certificate with its key, and the mesh roots."""
    watched = {"path": directory}
    secret_type = f"{_TYPES}.transport_sockets.tls.v3.Secret"
    certificate = {
        "@type": secret_type,
        "name": CERT_SECRET,
        "tls_certificate": {
            "certificate_chain": {"filename": f"{directory}/cert.pem"},
            "private_key": {"filename": f"{directory}/key.pem"},
            "watched_directory": watched,
        },
    }
    roots = {
        "@type": secret_type,
        "name": ROOTS_SECRET,
        "validation_context": {"trusted_ca": {"filename": f"{directory}/ca.pem"}, "watched_directory": watched},
    }
    return {SDS_FILES[CERT_SECRET]: {"resources": [certificate]}, SDS_FILES[ROOTS_SECRET]: {"resources": [roots]}}


def _tls_context(directory: str, **more: Any) -> dict[str, Any]:
    return {
        "tls_certificate_sds_secret_configs": [sds_secret(CERT_SECRET, directory)],
        "validation_context_sds_secret_config": sds_secret(ROOTS_SECRET, directory),
        **more,
    }


def _static_cluster(name: str, address: str, port: int, discovery: str = "STATIC") -> dict[str, Any]:
    endpoint = {"endpoint": {"address": {"socket_address": {"address": address, "port_value": port}}}}
    return {
        "name": name,
        "type": discovery,
        "connect_timeout": "5s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [endpoint]}]},
    }


def _ads_cluster(host: str, port: int, identity: EnvoyIdentity | None, mtls: bool) -> dict[str, Any]:
    try:
        ipaddress.ip_address(host)
        ip = True
    except ValueError:
        ip = False
    cluster = _static_cluster(XDS_CLUSTER, host, port, "STATIC" if ip else "STRICT_DNS")
    cluster["typed_extension_protocol_options"] = {
        _PROTOCOL_OPTIONS: {
            "@type": f"type.googleapis.com/{_PROTOCOL_OPTIONS}",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    if mtls and identity is not None:  # the ADS port wants our mesh certificate, and must prove it is that host
        context = _tls_context(identity.directory, alpn_protocols=["h2"])
        context["combined_validation_context"] = {
            "default_validation_context": {
                "match_typed_subject_alt_names": [
                    {"san_type": "IP_ADDRESS" if ip else "DNS", "matcher": {"exact": host}}
                ]
            },
            "validation_context_sds_secret_config": context.pop("validation_context_sds_secret_config"),
        }
        upstream: dict[str, Any] = {
            "@type": f"{_TYPES}.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": context,
        }
        if not ip:
            upstream["sni"] = host
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": upstream}
    return cluster


def _listener(name: str, address: str, port: int, manager: dict[str, Any], **chain: Any) -> dict[str, Any]:
    return {
        "name": name,
        "address": {"socket_address": {"address": address, "port_value": port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}], **chain}
        ],
    }


def _filter(name: str, message: str, **config: Any) -> dict[str, Any]:
    return {"name": name, "typed_config": {"@type": f"{_TYPES}.filters.http.{message}", **config}}


def _inbound(service: str, identity: EnvoyIdentity) -> tuple[dict[str, Any], dict[str, Any]]:
    """The inbound listener (mTLS, a mesh client certificate required; routes and RBAC over ADS) and the cluster
    to the app. Its RBAC filter denies every call unless the route says otherwise, so a route configuration not
    yet received (or one without the service's authorization) never lets a call through unchecked."""
    assert identity.inbound is not None and identity.app_port is not None
    address, port = identity.inbound
    ads = {"ads": {}, "resource_api_version": "V3"}
    manager = {
        "@type": _HCM,
        "stat_prefix": "mesh_inbound",
        "codec_type": "AUTO",
        "rds": {"route_config_name": INBOUND_ROUTES.format(service), "config_source": ads},
        # the app learns who called: the caller's verified SPIFFE ID (a header set by Envoy, never the caller's)
        "forward_client_cert_details": "SANITIZE_SET",
        "set_current_client_cert_details": {"uri": True},
        "http_filters": [
            _filter("envoy.filters.http.rbac", "rbac.v3.RBAC", rules={"action": "ALLOW"}),
            _filter("envoy.filters.http.router", "router.v3.Router"),
        ],
    }
    downstream = {
        "@type": f"{_TYPES}.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": True,
        "common_tls_context": _tls_context(identity.directory, alpn_protocols=["h2", "http/1.1"]),
    }
    listener = _listener(
        "mesh-inbound",
        address,
        port,
        manager,
        transport_socket={"name": "envoy.transport_sockets.tls", "typed_config": downstream},
    )
    app = _static_cluster(INBOUND_APP, "127.0.0.1", identity.app_port)
    app["typed_extension_protocol_options"] = {  # HTTP/1.1 or HTTP/2 (gRPC) to the app, as the caller spoke
        _PROTOCOL_OPTIONS: {"@type": f"type.googleapis.com/{_PROTOCOL_OPTIONS}", "use_downstream_protocol_config": {}}
    }
    return listener, app


def _stats_sink(node_id: str) -> dict[str, Any]:
    """Envoy's OpenTelemetry stats sink to the ADS port (the control plane turns its exports into the node's
    golden signals on the dashboard), as deltas every 2 s, with the mesh's latency buckets."""
    from .xds_stats import ENVOY_BUCKETS_MS, FLUSH_SECONDS  # pure: no protos

    return {
        "stats_flush_interval": f"{FLUSH_SECONDS:g}s",
        "stats_config": {
            "histogram_bucket_settings": [{"match": {"safe_regex": {"regex": ".*"}}, "buckets": ENVOY_BUCKETS_MS}]
        },
        "stats_sinks": [
            {
                "name": "envoy.stat_sinks.open_telemetry",
                "typed_config": {
                    "@type": f"{_TYPES}.stat_sinks.open_telemetry.v3.SinkConfig",
                    "grpc_service": {
                        "envoy_grpc": {"cluster_name": XDS_CLUSTER},
                        "initial_metadata": [{"key": "x-mesh-node", "value": node_id}],
                    },
                    "report_counters_as_deltas": True,
                    "report_histograms_as_deltas": True,
                },
            }
        ],
    }


def envoy_bootstrap(
    service: str,
    xds_host: str,
    xds_port: int,
    listen: int,
    admin: int,
    identity: EnvoyIdentity | None = None,
    ads_mtls: bool = False,
) -> dict[str, Any]:
    """An Envoy sidecar's bootstrap for an instance of ``service``: its app calls ``http://127.0.0.1:<listen>`` with
    ``Host: <service>``; routes (``mesh-outbound``: every service), clusters and endpoints come over ADS from the
    control plane. The listeners themselves are static (Envoy's listeners need an address, the mesh's are per
    client). With an ``identity``: mTLS to strict services and to an mTLS ADS port, and with ``identity.inbound``
    the inbound side of ``service`` too."""
    ads = {"ads": {}, "resource_api_version": "V3"}
    manager = {
        "@type": _HCM,
        "stat_prefix": "mesh_outbound",
        "rds": {"route_config_name": OUTBOUND, "config_source": ads},
        "http_filters": [
            _filter("envoy.filters.http.fault", "fault.v3.HTTPFault"),  # configured per service, on its virtual host
            _filter("envoy.filters.http.router", "router.v3.Router"),
        ],
    }
    node = _node(service)
    listeners = [_listener(OUTBOUND, "127.0.0.1", listen, manager)]
    clusters = [_ads_cluster(xds_host, xds_port, identity, ads_mtls)]
    if identity is not None:
        node["metadata"].update({TLS_META: "on", IDENTITY_DIR_META: identity.directory})
        if identity.inbound is not None:
            listener, app = _inbound(service, identity)
            listeners.append(listener)
            clusters.append(app)
    return {
        "node": node,
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        **_stats_sink(node["id"]),
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}],
            },
            "cds_config": ads,
        },
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


#: The longest identity directory a bootstrap or a node's metadata may name.
MAX_IDENTITY_DIR = 1024


def validate_identity_dir(directory: str) -> str:
    """An identity directory as Envoy will read it: absolute, bounded, no control characters (it ends up in file
    paths the control plane sends back to the node)."""
    if not directory.startswith("/"):
        raise ValueError(f"identity_dir: expected an absolute path, got {directory[:80]!r}")
    if len(directory) > MAX_IDENTITY_DIR:
        raise ValueError(f"identity_dir: longer than {MAX_IDENTITY_DIR} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in directory):
        raise ValueError("identity_dir: holds control characters")
    return directory.rstrip("/") or "/"
