"""Proxyless gRPC through the control plane's xDS port: grpcio's own xDS client (an ``xds:///`` channel, with the
bootstrap ``meshctl xds bootstrap`` writes) takes its listeners, routes, clusters and endpoints from a real
``meshctl serve --xds-port``, built from the registry and the rules. A 90/10 canary rule splits its calls; a rules
change and an instance that leaves reach it; a resource it refuses is parked, not resent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import grpc
from harness import ControlPlaneProcess, wait_for
from meshlib.wire import SECRET_HEADER
from xds_support import XdsClient, register, who_server

pytestmark = pytest.mark.e2e

METHOD = "/meshtest.Who/Name"


CANARY = {
    "services": {
        "inventory": {
            "subsets": {"stable": {"meta": {"version": "v1"}}, "canary": {"meta": {"version": "v2"}}},
            "routes": [
                {"name": "canary", "to": [{"subset": "stable", "weight": 90}, {"subset": "canary", "weight": 10}]}
            ],
        }
    }
}


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[dict[str, Any]]:
    cp = ControlPlaneProcess(tmp_path / "cp", extra_args=("--xds-port", "0"))
    servers = {name: who_server(name) for name in ("v1-a", "v2-a")}
    try:
        secrets = {name: register(cp, name, servers[name][1], "v" + name[1]) for name in servers}
        bootstrap = tmp_path / "bootstrap.json"
        meshctl = [sys.executable, "-m", "meshlib.cli", "--control-plane", cp.url]
        done = subprocess.run(
            [*meshctl, "xds", "bootstrap", "--service", "web", "-o", str(bootstrap)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert "GRPC_XDS_BOOTSTRAP=" in done.stdout
        yield {"cp": cp, "servers": servers, "bootstrap": bootstrap, "secrets": secrets}
    finally:
        for server, _ in servers.values():
            server.stop(0)
        cp.stop()


def test_the_bootstrap_names_the_ads_port_and_the_node(mesh: dict[str, Any]) -> None:
    bootstrap = json.loads(mesh["bootstrap"].read_text())
    port = httpx.get(mesh["cp"].url + "/v1/xds/clients").json()["port"]
    (server,) = bootstrap["xds_servers"]
    assert server["server_uri"] == f"127.0.0.1:{port}" and server["server_features"] == ["xds_v3"]
    assert bootstrap["node"]["cluster"] == "web" and bootstrap["node"]["id"].startswith("web.")


def test_grpc_s_xds_client_follows_the_canary_split_changes_and_instances(mesh: dict[str, Any]) -> None:
    cp = mesh["cp"]
    client = XdsClient(mesh["bootstrap"])
    try:
        first = client.calls(200)  # no rules yet: every instance, round robin (the first calls may find one ready)
        assert set(first) == {"v1-a", "v2-a"} and min(first.values()) >= 80, first

        cp.apply(CANARY)

        def split_applied() -> bool:
            return client.calls(20).get("v2-a", 0) < 10

        wait_for(split_applied, timeout=10, what="the canary rule to reach the xDS client")
        counts = client.calls(10_000)
        assert set(counts) == {"v1-a", "v2-a"}, counts
        share = counts["v2-a"] / 10_000
        assert 0.08 <= share <= 0.12, f"the canary got {share:.1%} of 10,000 calls, not 10% +- 2%"

        cp.apply(
            {
                "services": {
                    "inventory": {
                        "subsets": CANARY["services"]["inventory"]["subsets"],
                        "routes": [{"name": "all-canary", "to": [{"subset": "canary", "weight": 100}]}],
                    }
                }
            }
        )
        wait_for(lambda: client.calls(10) == {"v2-a": 10}, timeout=10, what="a rules change to reach the client")

        cp.apply({})  # the rules gone: every instance again; then v2-a leaves the registry
        wait_for(lambda: "v1-a" in client.calls(10), timeout=10, what="the rules' removal")
        gone = httpx.delete(cp.url + "/v1/registry/v2-a", headers={SECRET_HEADER: mesh["secrets"]["v2-a"]})
        assert gone.status_code == 200, gone.text
        wait_for(lambda: client.calls(20) == {"v1-a": 20}, timeout=10, what="a gone instance to be routed around")

        clients = httpx.get(cp.url + "/v1/xds/clients").json()["clients"]
        (node,) = [c for c in clients if c["node"].startswith("web.")]
        assert node["nacks"] == 0
        assert all(state["acked"] == state["sent"] for state in node["types"].values()), node
    finally:
        client.close()


class RawAds:
    """An ADS stream driven by hand, to answer the server with ACKs and NACKs of one's choosing."""

    def __init__(self, port: int) -> None:
        import queue

        from envoy.service.discovery.v3 import ads_pb2_grpc

        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.outbox: queue.Queue[Any] = queue.Queue()
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self.responses = stub.StreamAggregatedResources(iter(self.outbox.get, None), timeout=30)

    def send(self, kind: str, names: list[str], version: str = "", nonce: str = "", error: str = "") -> None:
        from envoy.service.discovery.v3 import discovery_pb2
        from google.rpc import status_pb2

        request = discovery_pb2.DiscoveryRequest(
            type_url=kind, resource_names=names, version_info=version, response_nonce=nonce
        )
        request.node.id = "raw~1"
        if error:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self.outbox.put(request)

    def next(self) -> Any:
        return next(self.responses)

    def close(self) -> None:
        self.outbox.put(None)
        self.channel.close()


def csds(channel: grpc.Channel, kind: str) -> list[Any]:
    """The raw client's resources of ``kind`` as the ADS port's CSDS service reports them."""
    from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc
    from envoy.type.matcher.v3 import node_pb2, string_pb2

    matcher = node_pb2.NodeMatcher(node_id=string_pb2.StringMatcher(exact="raw~1"))
    request = csds_pb2.ClientStatusRequest(node_matchers=[matcher])
    answer = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(channel).FetchClientStatus(request, timeout=5)
    (config,) = answer.config
    assert config.node.id == "raw~1"
    return [r for r in config.generic_xds_configs if r.type_url == kind]


def test_a_refused_version_is_parked_not_resent_and_the_next_change_goes_out(mesh: dict[str, Any]) -> None:
    from meshlib.control.xds_resources import CLUSTER, ROUTE

    cp = mesh["cp"]
    ads = RawAds(httpx.get(cp.url + "/v1/xds/clients").json()["port"])
    try:
        ads.send(ROUTE, ["inventory"])
        first = ads.next()
        assert first.type_url == ROUTE and len(first.resources) == 1
        ads.send(ROUTE, ["inventory"], version="", nonce=first.nonce, error="cannot take this route")
        ads.send(CLUSTER, ["inventory"])  # answered in order: the next response shows nothing was resent
        following = ads.next()
        assert following.type_url == CLUSTER, "the refused route configuration was sent again"

        (node,) = [c for c in httpx.get(cp.url + "/v1/xds/clients").json()["clients"] if c["node"] == "raw~1"]
        route = node["types"]["RouteConfiguration"]
        assert (node["nacks"], route["parked"], route["acked"]) == (1, first.version_info, "")
        assert route["error"] == "cannot take this route"

        status = subprocess.run(
            [sys.executable, "-m", "meshlib.cli", "--control-plane", cp.url, "status"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert f"raw~1: refused RouteConfiguration {first.version_info} (keeps none): cannot take this route" in (
            status.stdout
        ), status.stdout + status.stderr

        # CSDS on the same port says the same, per resource, as any xDS tool reads it
        from envoy.admin.v3.config_dump_shared_pb2 import NACKED
        from envoy.service.status.v3.csds_pb2 import ERROR, STALE, SYNCED

        (route_status,) = csds(ads.channel, ROUTE)
        assert (route_status.name, route_status.config_status, route_status.client_status) == (
            "inventory",
            ERROR,
            NACKED,
        )
        assert route_status.error_state.details == "cannot take this route"  # the reason, and the version refused
        assert route_status.error_state.version_info == first.version_info and not route_status.version_info
        (cluster_status,) = csds(ads.channel, CLUSTER)
        assert cluster_status.config_status == STALE and cluster_status.HasField("xds_config")  # not acked yet

        cp.apply(CANARY)  # a new version of the route configuration is a new chance
        ads.send(CLUSTER, ["inventory"], version=following.version_info, nonce=following.nonce)
        changed = ads.next()
        while changed.type_url != ROUTE:  # the rules also add the subsets' clusters
            ads.send(changed.type_url, ["inventory"], version=changed.version_info, nonce=changed.nonce)
            changed = ads.next()
        assert changed.version_info != first.version_info
        ads.send(ROUTE, ["inventory"], version=changed.version_info, nonce=changed.nonce)
        wait_for(
            lambda: (
                [(r.config_status, r.version_info) for r in csds(ads.channel, ROUTE)]
                == [(SYNCED, changed.version_info)]
            ),
            timeout=5,
            what="CSDS to show the new version synced",
        )
        wait_for(
            lambda: (
                [
                    c["types"]["RouteConfiguration"]["acked"]
                    for c in httpx.get(cp.url + "/v1/xds/clients").json()["clients"]
                    if c["node"] == "raw~1"
                ]
                == [changed.version_info]
            ),
            timeout=5,
            what="the new version's ACK",
        )
    finally:
        ads.close()


def test_the_unauthenticated_xds_port_is_refused_off_loopback(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")} | {"MESH_ADMIN_TOKEN": "a" * 32}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "meshlib.cli",
            "serve",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--xds-port",
            "0",
            "--state-dir",
            str(tmp_path / "cp"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "refusing a plaintext --xds-port on 0.0.0.0" in done.stderr and "Add --tls" in done.stderr


def test_the_service_s_faults_reach_grpc_s_xds_client(mesh: dict[str, Any]) -> None:
    """``faults.abort`` is carried as the fault filter's per-service config: gRPC's client aborts that share of its
    calls itself, with the gRPC code meshlib gives the same HTTP status (503: UNAVAILABLE)."""
    cp = mesh["cp"]
    client = XdsClient(mesh["bootstrap"])
    try:
        assert set(client.calls(20)) <= {"v1-a", "v2-a"}
        cp.apply({"services": {"inventory": {"faults": {"abort": {"percent": 50, "status": 503}}}}})
        wait_for(lambda: "error:UNAVAILABLE" in client.calls(20), timeout=10, what="the fault rule to reach the client")
        counts = client.calls(2000)
        share = counts.get("error:UNAVAILABLE", 0) / 2000
        assert 0.45 <= share <= 0.55 and set(counts) <= {"v1-a", "v2-a", "error:UNAVAILABLE"}, counts
        cp.apply({})
        wait_for(lambda: "error:UNAVAILABLE" not in client.calls(50), timeout=10, what="the fault's removal")
    finally:
        client.close()
