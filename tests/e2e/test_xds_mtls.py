"""Proxyless gRPC with mesh identities: ``meshctl xds bootstrap --identity-dir`` gets a certificate from the control
plane's CA (with the service's join token) and names it as gRPC's ``file_watcher`` certificate provider; the
control plane then sends that client mTLS clusters for services whose instances require mTLS. grpcio's own xDS
client calls a strict meshlib gRPC server over mTLS, and the server authorizes it by its SPIFFE identity exactly
as it authorizes meshlib's clients: allowed, denied, and a plaintext caller refused."""

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
import meshlib
import meshlib.grpc
from harness import ADMIN_TOKEN, ControlPlaneProcess, wait_for
from meshlib.settings import MeshSettings
from xds_support import XdsClient

pytestmark = pytest.mark.e2e

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


def token(cp: ControlPlaneProcess, service: str) -> str:
    r = httpx.post(cp.url + "/v1/tokens", json={"services": [service]}, headers=ADMIN, verify=cp.verify)
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


#: An xDS-enabled gRPC server (grpc.server(xds=True)) answering with its name: its listener (TLS, RBAC) comes
#: from the control plane.
SERVER = r"""
import sys, grpc
from concurrent import futures
server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), xds=True)
handler = grpc.unary_unary_rpc_method_handler(lambda request, context: b"inventory")
server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("meshtest.Who", {"Name": handler})])
server.add_secure_port(sys.argv[1], grpc.xds_server_credentials(grpc.insecure_server_credentials()))
server.start()
print("STARTED", flush=True)
server.wait_for_termination()
"""


def bootstrap(cp: ControlPlaneProcess, tmp: Path, service: str, join_token: str | None) -> Path:
    out = tmp / f"{service}.json"
    args = [sys.executable, "-m", "meshlib.cli", "--control-plane", cp.url, "xds", "bootstrap", "--service", service]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    if cp.scheme == "https":
        env["MESH_CONTROL_PLANE_CA"] = str(cp.state_dir / "ca-roots.pem")
    if join_token is not None:
        args += ["--identity-dir", str(tmp / f"{service}-identity")]
        env["MESH_BOOTSTRAP_TOKEN"] = join_token
    done = subprocess.run([*args, "-o", str(out)], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture
def strict_echo(tmp_path: Path) -> Iterator[dict[str, Any]]:
    cp = ControlPlaneProcess(tmp_path / "cp", extra_args=("--xds-port", "0"))
    server = mesh = None
    try:
        settings = MeshSettings.from_env(
            {},
            service="echo",
            control_plane=cp.url,
            tls="strict",
            bootstrap_token=token(cp, "echo"),
            stats_interval=0,
            state_dir=str(tmp_path / "echo"),
        )
        mesh = meshlib.Mesh(settings=settings)
        server = meshlib.grpc.server(mesh=mesh, port=0, drain_delay=0)
        handler = grpc.unary_unary_rpc_method_handler(lambda request, context: b"echo")
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("meshtest.Who", {"Name": handler})])
        server.start()

        def registered() -> bool:
            listed = httpx.get(cp.url + "/v1/registry/services/echo").json()["instances"]
            return any(i["meta"].get("mesh_tls") == "strict" for i in listed)

        wait_for(registered, timeout=10, what="the strict echo server in the registry")
        yield {"cp": cp, "mesh": mesh}
    finally:
        if server is not None:
            server.stop(0).wait(10)
        if mesh is not None:
            mesh.close()
        cp.stop()


def test_a_proxyless_client_with_a_mesh_identity_calls_a_strict_server_and_is_authorized_by_it(
    strict_echo: dict[str, Any], tmp_path: Path
) -> None:
    cp = strict_echo["cp"]
    cp.apply({"services": {"echo": {"authorization": {"allow": ["web"]}}}})
    wait_for(
        lambda: strict_echo["mesh"].rules.version >= 1, timeout=10, what="the server to take the authorization rule"
    )
    web = XdsClient(bootstrap(cp, tmp_path, "web", token(cp, "web")), "echo", xds_credentials=True)
    front = XdsClient(bootstrap(cp, tmp_path, "front", token(cp, "front")), "echo", xds_credentials=True)
    plain = XdsClient(bootstrap(cp, tmp_path, "plain", None), "echo", xds_credentials=True)
    try:
        assert web.calls(20) == {"echo": 20}  # mTLS, and the server's rule allows web
        assert front.calls(5) == {"error:PERMISSION_DENIED": 5}  # mTLS, but front is not allowed
        assert plain.calls(5) == {"error:UNAVAILABLE": 5}  # no identity: plaintext, refused by a strict server

        clients = {c["cluster"]: c for c in httpx.get(cp.url + "/v1/xds/clients").json()["clients"]}
        assert clients["web"]["mtls"] and clients["front"]["mtls"] and not clients["plain"]["mtls"]
        assert all(c["nacks"] == 0 for c in clients.values()), clients
    finally:
        for client in (web, front, plain):
            client.close()


def test_the_identity_files_are_the_service_s_and_the_key_is_private(strict_echo: dict[str, Any], tmp_path: Path):
    from cryptography import x509

    path = bootstrap(strict_echo["cp"], tmp_path, "web", token(strict_echo["cp"], "web"))
    providers = json.loads(path.read_text())["certificate_providers"]["mesh"]
    assert providers["plugin_name"] == "file_watcher"
    files = providers["config"]
    cert = x509.load_pem_x509_certificate(Path(files["certificate_file"]).read_bytes())
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(u) for u in uris.get_values_for_type(x509.UniformResourceIdentifier)] == [
        "spiffe://mesh.local/ns/default/sa/web"
    ]
    assert Path(files["private_key_file"]).stat().st_mode & 0o077 == 0


def test_identity_files_need_a_join_token(strict_echo: dict[str, Any], tmp_path: Path) -> None:
    args = [sys.executable, "-m", "meshlib.cli", "--control-plane", strict_echo["cp"].url, "xds", "bootstrap"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    done = subprocess.run(
        [*args, "--service", "web", "--identity-dir", str(tmp_path / "id")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 1 and "MESH_BOOTSTRAP_TOKEN" in done.stderr and "Traceback" not in done.stderr


def test_an_xds_configured_grpc_server_requires_mtls_and_authorizes_as_a_meshlib_server_does(
    strict_echo: dict[str, Any], tmp_path: Path
) -> None:
    """The same rule as for the meshlib server above, now enforced by gRPC itself (its listener's RBAC filter)."""
    from harness import free_port

    cp = strict_echo["cp"]
    inventory_token = token(cp, "inventory")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "GRPC_XDS_BOOTSTRAP": str(bootstrap(cp, tmp_path, "inventory", inventory_token))},
    )
    clients: list[XdsClient] = []
    try:
        body = {"id": "inventory-1", "service": "inventory", "address": "127.0.0.1", "port": port, "ttl": "3600s"}
        body["meta"] = {"mesh_tls": "strict"}
        r = httpx.put(
            cp.url + "/v1/registry/register", json=body, headers={"authorization": f"Bearer {inventory_token}"}
        )
        assert r.status_code == 200, r.text
        cp.apply({"services": {"inventory": {"authorization": {"allow": ["web"]}}}})
        web = XdsClient(bootstrap(cp, tmp_path, "web", token(cp, "web")), "inventory", xds_credentials=True)
        front = XdsClient(bootstrap(cp, tmp_path, "front", token(cp, "front")), "inventory", xds_credentials=True)
        plain = XdsClient(bootstrap(cp, tmp_path, "plain", None), "inventory", xds_credentials=True)
        clients += [web, front, plain]
        wait_for(lambda: web.calls(1) == {"inventory": 1}, timeout=20, what="the xDS server to serve web over mTLS")
        assert web.calls(20) == {"inventory": 20}
        assert front.calls(5) == {"error:PERMISSION_DENIED": 5}  # gRPC's RBAC filter, from the rule
        assert plain.calls(5) == {"error:UNAVAILABLE": 5}  # the listener requires a client certificate
        nodes = {c["cluster"]: c for c in httpx.get(cp.url + "/v1/xds/clients").json()["clients"]}
        assert nodes["inventory"]["mtls"] and all(n["nacks"] == 0 for n in nodes.values()), nodes

        cp.apply({"services": {"inventory": {"authorization": {"allow": ["web", "front"]}}}})
        wait_for(lambda: front.calls(1) == {"inventory": 1}, timeout=10, what="the new rule to reach the server")
    finally:
        for client in clients:
            client.close()
        server.kill()
        server.wait(10)


def test_with_tls_the_ads_port_itself_requires_a_mesh_certificate(tmp_path: Path) -> None:
    from concurrent import futures

    cp = ControlPlaneProcess(tmp_path / "cp", extra_args=("--xds-port", "0", "--tls"))
    who = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: b"inventory")
    who.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("meshtest.Who", {"Name": handler})])
    port = who.add_insecure_port("127.0.0.1:0")
    who.start()
    client = None
    try:
        inventory = token(cp, "inventory")
        body = {"id": "inv-1", "service": "inventory", "address": "127.0.0.1", "port": port, "ttl": "3600s"}
        r = httpx.put(
            cp.url + "/v1/registry/register",
            json=body,
            headers={"authorization": f"Bearer {inventory}"},
            verify=cp.verify,
        )
        assert r.status_code == 200, r.text
        ads_port = httpx.get(cp.url + "/v1/xds/clients", verify=cp.verify).json()["port"]

        # a client with a mesh certificate reads its configuration over mTLS
        path = bootstrap(cp, tmp_path, "web", token(cp, "web"))
        (creds,) = json.loads(path.read_text())["xds_servers"][0]["channel_creds"]
        assert creds["type"] == "tls" and set(creds["config"]) >= {"certificate_file", "ca_certificate_file"}
        client = XdsClient(path, "inventory", xds_credentials=True)
        assert client.calls(10) == {"inventory": 10}

        # without one, the ADS port refuses the connection: plaintext, and TLS with no client certificate
        from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

        roots = (cp.state_dir / "ca-roots.pem").read_bytes()
        for channel in (
            grpc.insecure_channel(f"127.0.0.1:{ads_port}"),
            grpc.secure_channel(f"127.0.0.1:{ads_port}", grpc.ssl_channel_credentials(roots)),
        ):
            stream = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(
                iter([discovery_pb2.DiscoveryRequest(type_url="type.googleapis.com/envoy.config.cluster.v3.Cluster")]),
                timeout=5,
            )
            with pytest.raises(grpc.RpcError) as refused:
                next(stream)
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
            channel.close()

        # and meshctl says what to do instead of writing a bootstrap that cannot connect
        args = [sys.executable, "-m", "meshlib.cli", "--control-plane", cp.url, "xds", "bootstrap", "--service", "web"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
        env["MESH_CONTROL_PLANE_CA"] = str(cp.state_dir / "ca-roots.pem")
        done = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 1 and "--identity-dir" in done.stderr, done.stderr
    finally:
        if client is not None:
            client.close()
        who.stop(0)
        cp.stop()
