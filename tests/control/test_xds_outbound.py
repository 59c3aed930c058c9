"""The Envoy sidecars' route configuration (``mesh-outbound``) beside gRPC's per-service ones: one virtual host per
service, and method matches carried for Envoy only (a gRPC call is always POST)."""

from __future__ import annotations

from envoy.config.route.v3 import route_pb2

from meshlib.control.xds_names import OUTBOUND
from meshlib.control.xds_resources import LISTENER, ROUTE, InstanceView, build_snapshot
from meshlib.rules.model import validate_rules

RULES = validate_rules(
    {
        "services": {
            "inventory": {
                "routes": [
                    {"name": "reads", "match": {"methods": ["GET"]}, "to": [{"weight": 100}]},
                    {
                        "name": "writes",
                        "match": {"methods": ["PUT", "DELETE"], "path_prefix": "/items"},
                        "to": [{"weight": 100}],
                    },
                ]
            }
        }
    },
    3,
)


def routes_of(snapshot, name: str) -> route_pb2.RouteConfiguration:
    config = route_pb2.RouteConfiguration()
    snapshot.resources[ROUTE][name].Unpack(config)
    return config


def test_envoy_gets_one_virtual_host_per_service_with_method_matches():
    snapshot = build_snapshot({"inventory": [InstanceView("127.0.0.1", 1)], "ledger": []}, RULES)
    outbound = routes_of(snapshot, OUTBOUND)
    hosts = {h.name: h for h in outbound.virtual_hosts}
    assert set(hosts) == {"inventory", "ledger"}
    assert list(hosts["inventory"].domains) == ["inventory", "inventory:*"]
    reads, writes, default = hosts["inventory"].routes
    assert [(h.name, h.string_match.exact) for h in reads.match.headers] == [(":method", "GET")]
    assert writes.match.prefix == "/items"
    assert [(h.name, h.string_match.safe_regex.regex) for h in writes.match.headers] == [(":method", "DELETE|PUT")]
    assert default.name == "default" and not default.match.headers


def test_grpc_s_route_configuration_leaves_out_routes_for_other_methods():
    snapshot = build_snapshot({"inventory": [InstanceView("127.0.0.1", 1)]}, RULES)
    (host,) = routes_of(snapshot, "inventory").virtual_hosts
    assert [r.name for r in host.routes] == ["default"] and list(host.domains) == ["*"]


def test_a_server_listener_carries_mtls_and_the_allow_list_as_meshlib_reads_it():
    from envoy.config.listener.v3 import listener_pb2
    from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm

    rules = validate_rules(
        {"services": {"inventory": {"authorization": {"allow": ["web", "*", "spiffe://other.td/ns/x/sa/y"]}}}}, 4
    )
    member = InstanceView("127.0.0.1", 5000, meta={"mesh_tls": "strict"})
    snapshot = build_snapshot({"inventory": [member]}, rules, trust_domain="prod.td")
    name = "grpc/server?xds.resource.listening_address=127.0.0.1:5000"
    with_identity, without = listener_pb2.Listener(), listener_pb2.Listener()
    snapshot.by_name(LISTENER, True)[name].Unpack(with_identity)
    snapshot.by_name(LISTENER, False)[name].Unpack(without)
    assert with_identity.filter_chains[0].HasField("transport_socket")
    assert not without.filter_chains[0].HasField("transport_socket")
    manager = hcm.HttpConnectionManager()
    with_identity.filter_chains[0].filters[0].typed_config.Unpack(manager)
    assert [f.name for f in manager.http_filters] == ["envoy.filters.http.rbac", "envoy.filters.http.router"]
    rbac = rbac_pb2.RBAC()
    manager.http_filters[0].typed_config.Unpack(rbac)
    principals = rbac.rules.policies["mesh-allow"].principals
    matchers = sorted(str(p.authenticated.principal_name).replace("\n", " ").strip() for p in principals)
    assert matchers == [
        'exact: "spiffe://other.td/ns/x/sa/y"',
        'exact: "spiffe://prod.td/ns/default/sa/web"',
        'prefix: "spiffe://prod.td/"',
    ]
