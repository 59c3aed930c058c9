"""The mesh's security as xDS: mTLS with mesh identities (gRPC's certificate providers, gRFC A29) on both sides of
a hop, and ``authorization`` as RBAC on verified SPIFFE IDs (gRFC A41). No I/O; ``xds_resources`` places these in
the clusters (a client's side) and in the inbound listeners of xDS-enabled gRPC servers."""

from __future__ import annotations

import re
from typing import Any

from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2 as tls_common_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from google.protobuf import any_pb2, wrappers_pb2

from ..policy.rules import Authorization

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
    san = string_pb2.StringMatcher(
        safe_regex=regex_pb2.RegexMatcher(
            regex=f"spiffe://{re.escape(trust_domain)}/ns/[a-z0-9-]+/sa/{re.escape(service)}"
        )
    )
    return _socket(tls_pb2.UpstreamTlsContext(common_tls_context=_common_tls(san)))


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
