"""What an Envoy sidecar with a mesh identity is sent and started from: clusters to strict services with mTLS
through the SDS files in its own identity directory, the inbound route configuration carrying the service's
authorization as per-route RBAC, and a bootstrap whose inbound listener demands a mesh client certificate."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

from meshlib.control.xds_bootstraps import EnvoyIdentity, envoy_bootstrap, sds_files, validate_identity_dir
from meshlib.control.xds_names import INBOUND_ROUTES
from meshlib.control.xds_resources import CLUSTER, MAX_IDENTITY_DIRS, ROUTE, InstanceView, build_snapshot
from meshlib.rules.model import validate_rules

STRICT = InstanceView("127.0.0.1", 5000, meta={"mesh_tls": "strict"})
PLAIN = InstanceView("127.0.0.1", 5001)


def tls_of(by_name: dict, name: str) -> tls_pb2.UpstreamTlsContext | None:
    cluster = cluster_pb2.Cluster()
    by_name[name].Unpack(cluster)
    if not cluster.HasField("transport_socket"):
        return None
    context = tls_pb2.UpstreamTlsContext()
    cluster.transport_socket.typed_config.Unpack(context)
    return context


def test_an_envoy_node_gets_mtls_through_its_own_sds_files_to_strict_services_only():
    snapshot = build_snapshot({"ledger": [STRICT], "catalog": [PLAIN]}, validate_rules({}, 1), trust_domain="t.d")
    envoy = snapshot.by_name(CLUSTER, True, "/srv/orders-id")
    context = tls_of(envoy, "ledger")
    assert context is not None and tls_of(envoy, "catalog") is None
    common = context.common_tls_context
    (cert,) = common.tls_certificate_sds_secret_configs
    assert cert.sds_config.path_config_source.path == "/srv/orders-id/cert-sds.json"
    assert cert.sds_config.path_config_source.watched_directory.path == "/srv/orders-id"
    validation = common.combined_validation_context
    assert validation.validation_context_sds_secret_config.sds_config.path_config_source.path == (
        "/srv/orders-id/roots-sds.json"
    )
    (san,) = validation.default_validation_context.match_typed_subject_alt_names
    assert san.matcher.safe_regex.regex == r"spiffe://t\.d/ns/[a-z0-9-]+/sa/ledger"
    # a gRPC node with an identity keeps its certificate-provider clusters; a node without one, plaintext
    grpc_context = tls_of(snapshot.by_name(CLUSTER, True), "ledger")
    assert grpc_context is not None and not grpc_context.common_tls_context.tls_certificate_sds_secret_configs
    assert tls_of(snapshot.by_name(CLUSTER, False, "/srv/orders-id"), "ledger") is None
    # each directory its own variant, built once and bounded
    assert snapshot.by_name(CLUSTER, True, "/srv/orders-id") is envoy
    other = tls_of(snapshot.by_name(CLUSTER, True, "/other"), "ledger")
    assert other is not None
    assert other.common_tls_context.tls_certificate_sds_secret_configs[0].sds_config.path_config_source.path == (
        "/other/cert-sds.json"
    )
    for n in range(MAX_IDENTITY_DIRS + 10):
        snapshot.by_name(CLUSTER, True, f"/d{n}")
    assert len(snapshot._envoy) == MAX_IDENTITY_DIRS


def inbound_rbac(document: dict) -> rbac_pb2.RBACPerRoute:
    snapshot = build_snapshot({"orders": [STRICT]}, validate_rules(document, 2))
    config = route_pb2.RouteConfiguration()
    snapshot.resources[ROUTE][INBOUND_ROUTES.format("orders")].Unpack(config)
    (host,) = config.virtual_hosts
    (route,) = host.routes
    assert route.route.cluster == "mesh-inbound-app"
    per_route = rbac_pb2.RBACPerRoute()
    route.typed_per_filter_config["envoy.filters.http.rbac"].Unpack(per_route)
    return per_route


@pytest.mark.parametrize("mode", ["strict", "permissive", "off", None])
def test_the_inbound_route_carries_the_service_s_authorization(mode: str | None):
    authorization = {"allow": ["billing"]} | ({"mode": mode} if mode else {})
    per_route = inbound_rbac({"services": {"orders": {"authorization": authorization}}} if mode else {})
    if mode == "strict":
        assert list(per_route.rbac.rules.policies) == ["mesh-allow"] and not per_route.rbac.HasField("shadow_rules")
    elif mode == "permissive":  # recorded, never enforced
        assert not per_route.rbac.HasField("rules") and list(per_route.rbac.shadow_rules.policies) == ["mesh-allow"]
    else:  # no rbac on the route: the listener's deny-all is off for it, every mesh identity gets through
        assert not per_route.HasField("rbac")


def test_the_bootstrap_s_inbound_listener_requires_a_mesh_client_certificate_and_denies_by_default():
    identity = EnvoyIdentity("/srv/id", ("0.0.0.0", 8443), 8080)
    bootstrap = envoy_bootstrap("orders", "10.0.0.1", 18000, 15001, 15000, identity)
    assert bootstrap["node"]["metadata"] == {
        "mesh.service": "orders",
        "mesh.tls": "on",
        "mesh.identity_dir": "/srv/id",
    }
    outbound, inbound = bootstrap["static_resources"]["listeners"]
    assert outbound["name"] == "mesh-outbound"
    (chain,) = inbound["filter_chains"]
    downstream = chain["transport_socket"]["typed_config"]
    assert downstream["require_client_certificate"] is True
    manager = chain["filters"][0]["typed_config"]
    assert manager["rds"]["route_config_name"] == "mesh-inbound/orders"
    assert manager["forward_client_cert_details"] == "SANITIZE_SET"
    rbac, router = manager["http_filters"]
    assert router["name"] == "envoy.filters.http.router"
    assert rbac["typed_config"]["rules"] == {"action": "ALLOW"}  # no policy: nothing allowed without the route's
    ads, app = bootstrap["static_resources"]["clusters"]
    assert "transport_socket" not in ads  # plaintext ADS unless the port requires mTLS
    endpoint = app["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert endpoint == {"address": "127.0.0.1", "port_value": 8080}
    secured = envoy_bootstrap("orders", "cp.example", 18000, 15001, 15000, EnvoyIdentity("/srv/id"), ads_mtls=True)
    (ads,) = secured["static_resources"]["clusters"]
    upstream = ads["transport_socket"]["typed_config"]
    assert upstream["sni"] == "cp.example"
    (san,) = upstream["common_tls_context"]["combined_validation_context"]["default_validation_context"][
        "match_typed_subject_alt_names"
    ]
    assert san == {"san_type": "DNS", "matcher": {"exact": "cp.example"}}


def test_sds_files_name_the_identity_files_in_their_directory():
    files = sds_files("/srv/id")
    (cert,) = files["cert-sds.json"]["resources"]
    assert cert["tls_certificate"]["private_key"] == {"filename": "/srv/id/key.pem"}
    (roots,) = files["roots-sds.json"]["resources"]
    assert roots["validation_context"]["trusted_ca"] == {"filename": "/srv/id/ca.pem"}


@pytest.mark.parametrize(
    ("directory", "problem"),
    [("relative/id", "absolute"), ("/x" * 600, "longer"), ("/srv/id\n/evil", "control"), ("/a\x00b", "control")],
)
def test_identity_directories_are_absolute_bounded_and_plain(directory: str, problem: str):
    with pytest.raises(ValueError, match=problem):
        validate_identity_dir(directory)
    assert validate_identity_dir("/srv/id/") == "/srv/id"
