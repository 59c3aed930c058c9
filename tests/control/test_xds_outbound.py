"""The Envoy sidecars' route configuration (``mesh-outbound``) beside gRPC's per-service ones: one virtual host per
service, and method matches carried for Envoy only (a gRPC call is always POST)."""

from __future__ import annotations

from envoy.config.route.v3 import route_pb2

from meshlib.control.xds_names import OUTBOUND
from meshlib.control.xds_resources import ROUTE, InstanceView, build_snapshot
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
