"""The mesh's security as xDS: mTLS with mesh identities (gRPC's certificate providers, gRFC A29) on both sides of
a hop, and ``authorization`` as RBAC on verified SPIFFE IDs (gRFC A41). No I/O; ``xds_resources`` places these in
the clusters (a client's side) and in the inbound listeners of xDS-enabled gRPC servers."""

from __future__ import annotations

import re
from typing import Any

from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2 as tls_common_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from google.protobuf import any_pb2, wrappers_pb2

from ..policy.rules import Authorization
from .xds_names import CERT_SECRET, INBOUND_APP, INBOUND_ROUTES, ROOTS_SECRET, SDS_FILES

#: The certificate provider instance a bootstrap with mesh identity files names: ``file_watcher`` over the files
#: ``meshctl xds bootstrap --identity-dir`` writes.
PROVIDER = "mesh"
HCM_FILTER = "envoy.filters.network.http_connection_manager"
#: The Listener an xDS-enabled gRPC server asks for (``server_listener_resource_name_template`` in its bootstrap).
SERVER_LISTENER = "grpc/server?xds.resource.listening_address={}"


def pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _common_tls(peer: string_pb2.StringMatcher | None = None) -> tls_pb2.CommonTlsContext:
    """Our certificate and the mesh roots from the ``mesh`` provider; ``peer``: the identity the other side must
    prove."""
    provider = tls_common_pb2.CertificateProviderPluginInstance(instance_name=PROVIDER)
    validation = tls_common_pb2.CertificateValidationContext(ca_certificate_provider_instance=provider)
    if peer is not None:
        validation.match_subject_alt_names.append(peer)
    return tls_pb2.CommonTlsContext(tls_certificate_provider_instance=provider, validation_context=validation)


def _socket(context: Any) -> base_pb2.TransportSocket:
    return base_pb2.TransportSocket(name="envoy.transport_sockets.tls", typed_config=pack(context))


def upstream_tls(service: str, trust_domain: str) -> base_pb2.TransportSocket:
    """mTLS to ``service``: the server must prove it is ``service`` (its SPIFFE ID, in any namespace of the trust
    domain)."""
    return _socket(tls_pb2.UpstreamTlsContext(common_tls_context=_common_tls(_peer(service, trust_domain))))


def _peer(service: str, trust_domain: str) -> string_pb2.StringMatcher:
    """Any SPIFFE ID of ``service`` in the trust domain (any namespace: the registry records none)."""
    return string_pb2.StringMatcher(
        safe_regex=regex_pb2.RegexMatcher(
            regex=f"spiffe://{re.escape(trust_domain)}/ns/[a-z0-9-]+/sa/{re.escape(service)}"
        )
    )


def sds_secret(name: str, directory: str) -> secret_pb2.SdsSecretConfig:
    """One of an Envoy sidecar's two secrets, read through SDS from its file in the identity directory (Envoy
    reloads it when the file is replaced: a renewed certificate needs no restart)."""
    source = config_source_pb2.ConfigSource(
        path_config_source=config_source_pb2.PathConfigSource(
            path=f"{directory}/{SDS_FILES[name]}",
            watched_directory=base_pb2.WatchedDirectory(path=directory),
        ),
        resource_api_version=config_source_pb2.V3,
    )
    return secret_pb2.SdsSecretConfig(name=name, sds_config=source)


def envoy_upstream_tls(service: str, trust_domain: str, directory: str) -> base_pb2.TransportSocket:
    """Envoy's mTLS to ``service``: its mesh certificate and the roots from the SDS files in ``directory`` (Envoy
    has no ``file_watcher`` provider), and the server must prove it is ``service``."""
    san = tls_common_pb2.SubjectAltNameMatcher(
        san_type=tls_common_pb2.SubjectAltNameMatcher.URI, matcher=_peer(service, trust_domain)
    )
    context = tls_pb2.CommonTlsContext(
        tls_certificate_sds_secret_configs=[sds_secret(CERT_SECRET, directory)],
        combined_validation_context=tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
            default_validation_context=tls_common_pb2.CertificateValidationContext(match_typed_subject_alt_names=[san]),
            validation_context_sds_secret_config=sds_secret(ROOTS_SECRET, directory),
        ),
    )
    return _socket(tls_pb2.UpstreamTlsContext(common_tls_context=context))


def inbound_routes(
    service: str, authorization: Authorization | None, trust_domain: str
) -> route_pb2.RouteConfiguration:
    """What an Envoy sidecar's inbound listener for ``service`` routes by: every call to the app, with the
    service's ``authorization`` as the route's RBAC. The listener's own RBAC denies everything, so this route
    decides: ``strict`` enforces the allow list, ``permissive`` only records what it would deny (Envoy's shadow
    rules, as a meshlib server logs and lets through), ``off`` (or no rule) lets every mesh identity through."""
    route = route_components_pb2.Route(
        name="app",
        match=route_components_pb2.RouteMatch(prefix=""),
        route=route_components_pb2.RouteAction(cluster=INBOUND_APP),
    )
    per_route = rbac_filter_pb2.RBACPerRoute()  # no rbac: the filter is off for this route
    if authorization is not None and authorization.mode == "strict":
        per_route.rbac.CopyFrom(rbac(authorization, trust_domain))
    elif authorization is not None and authorization.mode == "permissive":
        per_route.rbac.shadow_rules.CopyFrom(rbac(authorization, trust_domain).rules)
    route.typed_per_filter_config["envoy.filters.http.rbac"].CopyFrom(pack(per_route))
    host = route_components_pb2.VirtualHost(name=service, domains=["*"], routes=[route])
    return route_pb2.RouteConfiguration(name=INBOUND_ROUTES.format(service), virtual_hosts=[host])


def server_listener(
    address: str, port: int, strict: bool, authorization: Authorization | None, trust_domain: str
) -> listener_pb2.Listener:
    """An xDS-enabled gRPC server's inbound side, as a meshlib server of the same service behaves: mTLS with a client
    certificate required when ``strict``, and ``authorization`` (mode strict) as RBAC."""
    filters = []
    if authorization is not None and authorization.mode == "strict":
        filters.append(
            hcm_pb2.HttpFilter(name="envoy.filters.http.rbac", typed_config=pack(rbac(authorization, trust_domain)))
        )
    filters.append(hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=pack(router_pb2.Router())))
    inbound = route_components_pb2.VirtualHost(
        name="inbound",
        domains=["*"],
        routes=[
            route_components_pb2.Route(
                match=route_components_pb2.RouteMatch(prefix=""),
                non_forwarding_action=route_components_pb2.NonForwardingAction(),
            )
        ],
    )
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix="inbound",
        route_config=route_pb2.RouteConfiguration(name="inbound", virtual_hosts=[inbound]),
        http_filters=filters,
    )
    chain = listener_components_pb2.FilterChain(
        filters=[listener_components_pb2.Filter(name=HCM_FILTER, typed_config=pack(manager))]
    )
    if strict:
        context = tls_pb2.DownstreamTlsContext(
            require_client_certificate=wrappers_pb2.BoolValue(value=True), common_tls_context=_common_tls()
        )
        chain.transport_socket.CopyFrom(_socket(context))
    return listener_pb2.Listener(
        name=SERVER_LISTENER.format(f"{address}:{port}"),
        address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address=address, port_value=port)),
        filter_chains=[chain],
    )


def rbac(policy: Authorization, trust_domain: str, namespace: str = "default") -> rbac_filter_pb2.RBAC:
    """``authorization.allow`` as an ALLOW policy on the caller's verified SPIFFE ID, with meshlib's meaning of each
    entry: ``*`` any identity of the trust domain, a SPIFFE URI that identity, a name that service in the server's
    namespace (``default``: the registry records no namespace)."""
    principals = []
    for entry in sorted(policy.allow):
        if entry == "*":
            matcher = string_pb2.StringMatcher(prefix=f"spiffe://{trust_domain}/")
        elif entry.startswith("spiffe://"):
            matcher = string_pb2.StringMatcher(exact=entry)
        else:
            matcher = string_pb2.StringMatcher(exact=f"spiffe://{trust_domain}/ns/{namespace}/sa/{entry}")
        principals.append(rbac_pb2.Principal(authenticated=rbac_pb2.Principal.Authenticated(principal_name=matcher)))
    rules = rbac_pb2.RBAC(action=rbac_pb2.RBAC.ALLOW)
    if principals:
        rules.policies["mesh-allow"].CopyFrom(
            rbac_pb2.Policy(permissions=[rbac_pb2.Permission(any=True)], principals=principals)
        )
    return rbac_filter_pb2.RBAC(rules=rules)
