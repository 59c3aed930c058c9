"""Attack: with one service's join token, take another service's identity. Join tokens are scoped to service names
(as Consul scopes ``service:write``): a ``web`` token cannot get a ``payments`` certificate, register, heartbeat,
deregister or report stats as ``payments``; a revoked token stops working at once; the shared bootstrap token is
an explicit development mode that warns; the admin token can never equal it. Against real ``meshctl serve``."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import meshlib
from harness import ADMIN_TOKEN, startup_lines, wait_for
from meshlib.discovery.static import StaticDiscovery
from meshlib.errors import IdentityError
from meshlib.telemetry.metrics import LATENCY_BUCKETS

pytestmark = pytest.mark.e2e  # its tests start processes (servers, a control plane, meshctl)


def create_token(cp, *services: str, **extra: object) -> str:
    r = httpx.post(cp.url + "/v1/tokens", json={"services": list(services), **extra}, headers=cp.admin())
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


def bearer(token: str, **extra: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}", **extra}


def csr_for(service: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def sign(cp, token: str, service: str, namespace: str = "default") -> httpx.Response:
    body = {"csr": csr_for(service), "service": service, "namespace": namespace}
    return httpx.post(cp.url + "/v1/ca/sign", json=body, headers=bearer(token))


def registration(service: str, port: int) -> dict[str, object]:
    return {"id": f"{service}-1", "service": service, "address": "127.0.0.1", "port": port, "ttl": "30s"}


def report(service: str, instance: str) -> dict[str, object]:
    return {
        "v": 1,
        "instance": instance,
        "service": service,
        "address": "127.0.0.1",
        "port": 8001,
        "started": time.time(),
        "interval": 2.0,
        "tls": "strict",
        "identity": None,
        "rules_version": 0,
        "buckets": list(LATENCY_BUCKETS),
        "inbound": [],
        "outbound": [],
        "counters": [],
        "verified_peers": {},
        "endpoints": [],
    }


@pytest.fixture
def cp(control_plane):
    return control_plane()  # an admin token, no shared bootstrap token: join tokens only


def test_a_web_token_cannot_act_as_payments(cp):
    web = create_token(cp, "web")
    payments = create_token(cp, "payments")

    denied = sign(cp, web, "payments")
    assert denied.status_code == 403 and "'payments'" in denied.json()["error"], denied.text
    assert sign(cp, web, "web").status_code == 200
    assert sign(cp, web, "web", namespace="prod").status_code == 403  # the token's namespace is "default"

    r = httpx.put(cp.url + "/v1/registry/register", json=registration("payments", 8001), headers=bearer(web))
    assert r.status_code == 403
    assert httpx.get(cp.url + "/v1/registry/services/payments").json()["instances"] == []

    owner = httpx.put(cp.url + "/v1/registry/register", json=registration("payments", 8001), headers=bearer(payments))
    assert owner.status_code == 200
    secret = owner.json()["secret"]
    # even with the instance's secret (leaked, say), a web token cannot heartbeat or remove payments' entry
    assert (
        httpx.put(
            cp.url + "/v1/registry/heartbeat/payments-1", headers=bearer(web, **{"x-mesh-instance-secret": secret})
        ).status_code
        == 403
    )
    assert (
        httpx.delete(
            cp.url + "/v1/registry/payments-1", headers=bearer(web, **{"x-mesh-instance-secret": secret})
        ).status_code
        == 403
    )
    assert (
        httpx.put(
            cp.url + "/v1/registry/heartbeat/payments-1", headers=bearer(payments, **{"x-mesh-instance-secret": secret})
        ).status_code
        == 200
    )

    # stats: a web token cannot report for payments; a payments token cannot forge a registered instance's
    # figures without its secret
    forged = httpx.post(cp.url + "/v1/stats/report", json=report("payments", "payments-9"), headers=bearer(web))
    assert forged.status_code == 403
    no_secret = httpx.post(cp.url + "/v1/stats/report", json=report("payments", "payments-1"), headers=bearer(payments))
    assert no_secret.status_code == 403 and "x-mesh-instance-secret" in no_secret.json()["error"]
    ok = httpx.post(
        cp.url + "/v1/stats/report",
        json=report("payments", "payments-1"),
        headers=bearer(payments, **{"x-mesh-instance-secret": secret}),
    )
    assert ok.status_code == 204, ok.text


def test_a_revoked_token_stops_working_and_tokens_are_stored_hashed(cp):
    token = create_token(cp, "web", description="web team")
    assert sign(cp, token, "web").status_code == 200
    [listed] = httpx.get(cp.url + "/v1/tokens", headers=cp.admin()).json()["tokens"]
    assert listed["state"] == "active" and listed["services"] == ["web"] and "token" not in listed
    secret = token.rsplit(".", 1)[1]
    assert secret.encode() not in (cp.state_dir / "tokens.db").read_bytes()

    assert httpx.delete(cp.url + f"/v1/tokens/{listed['id']}", headers=cp.admin()).status_code == 200
    refused = sign(cp, token, "web")
    assert refused.status_code == 401 and "revoked" in refused.json()["error"]
    r = httpx.put(cp.url + "/v1/registry/register", json=registration("web", 8002), headers=bearer(token))
    assert r.status_code == 401
    # a token without the admin token cannot list or make tokens
    assert httpx.get(cp.url + "/v1/tokens", headers=bearer(token)).status_code == 401
    assert httpx.post(cp.url + "/v1/tokens", json={"services": ["x"]}).status_code == 401


def test_an_expired_token_is_refused(cp):
    token = create_token(cp, "web", ttl_seconds=1)
    wait_for(lambda: sign(cp, token, "web").status_code == 401, timeout=10, what="the token to expire")
    assert "expired" in sign(cp, token, "web").json()["error"]


def test_a_real_instance_joins_with_its_own_token_and_not_as_another(cp, tmp_path):
    token = create_token(cp, "payments")
    env = {"MESH_CONTROL_PLANE": cp.url, "MESH_BOOTSTRAP_TOKEN": token}
    os.environ.update(env)
    try:
        mesh = meshlib.Mesh(
            service="payments",
            discovery=StaticDiscovery({}),
            control_plane=cp.url,
            tls="strict",
            state_dir=str(tmp_path / "p"),
        )
        try:
            assert mesh.identity is not None and mesh.identity.id.service == "payments"
        finally:
            mesh.close()
        with pytest.raises(IdentityError) as refused:
            meshlib.Mesh(
                service="ledger",
                discovery=StaticDiscovery({}),
                control_plane=cp.url,
                tls="strict",
                state_dir=str(tmp_path / "l"),
            )
        assert "may not act as 'ledger'" in str(refused.value) and "within" not in str(refused.value)
    finally:
        for key in env:
            os.environ.pop(key, None)


def test_meshctl_token_create_list_revoke(cp):
    env = {**os.environ, "MESH_ADMIN_TOKEN": ADMIN_TOKEN, "MESH_CONTROL_PLANE": cp.url}

    def meshctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "meshlib.cli", "token", *args], capture_output=True, text=True, env=env, timeout=60
        )

    created = meshctl("create", "--service", "inventory", "--ttl", "30d", "--description", "inventory team")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("mjt.") and "MESH_BOOTSTRAP_TOKEN" in created.stderr
    assert sign(cp, token, "inventory").status_code == 200
    listing = meshctl("list")
    assert "inventory" in listing.stdout and "active" in listing.stdout
    token_id = token.split(".")[1]
    assert meshctl("revoke", token_id).returncode == 0
    assert "revoked" in meshctl("list").stdout
    unknown = meshctl("revoke", "nosuchtoken")
    assert unknown.returncode == 1 and "no join token" in unknown.stderr and "Traceback" not in unknown.stderr


def test_the_shared_bootstrap_token_is_development_mode_and_says_so(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env["MESH_BOOTSTRAP_TOKEN"] = "shared-dev-token"
    text = startup_lines(env, tmp_path / "cp")
    assert "development mode" in text and "ANY" in text and "meshctl token create" in text


def test_the_admin_token_may_not_equal_the_bootstrap_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(MESH_ADMIN_TOKEN="same-token", MESH_BOOTSTRAP_TOKEN="same-token")
    proc = subprocess.run(
        [sys.executable, "-m", "meshlib.cli", "serve", "--port", "0", "--state-dir", str(tmp_path / "cp")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 1
    assert "MESH_ADMIN_TOKEN equals MESH_BOOTSTRAP_TOKEN" in proc.stderr and "Traceback" not in proc.stderr
