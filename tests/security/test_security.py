"""Mesh TLS with real handshakes: SPIFFE identities from the control plane's CA, strict and permissive servers,
rotation, authorization, and interop with independent TLS stacks (curl, openssl s_client)."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import ssl
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import meshlib
from harness import Upstream, wait_for
from meshlib.discovery import StaticDiscovery
from meshlib.endpoints import Endpoint
from meshlib.security.ca import CertificateAuthority

pytestmark = pytest.mark.e2e  # its tests start processes (servers, a control plane, meshctl)

BOOTSTRAP = "test-bootstrap-token"


@pytest.fixture
def secure_cp(control_plane, tmp_path):
    cp = control_plane(tmp_path / "cp", bootstrap_token=BOOTSTRAP)
    return cp


def instance_env(cp, tmp_path: Path, name: str, mode: str = "strict", **extra: str) -> dict[str, str]:
    return {
        "MESH_DISCOVERY": f"registry://127.0.0.1:{cp.port}",
        "MESH_CONTROL_PLANE": cp.url,
        "MESH_STATE_DIR": str(tmp_path / "state" / name),
        "MESH_BOOTSTRAP_TOKEN": BOOTSTRAP,
        "MESH_TLS": mode,
        **extra,
    }


@pytest.fixture
def instances():
    started: list[Upstream] = []
    yield started
    for u in started:
        u.stop()


def start(started: list[Upstream], name: str, service: str, env: dict[str, str]) -> Upstream:
    upstream = Upstream(name, mesh_service=service, env=env)
    started.append(upstream)
    return upstream.wait_listening()


def client_files(cp, tmp_path: Path, service: str, lifetime: dt.timedelta = dt.timedelta(hours=1)):
    """A certificate for ``service`` issued by the mesh CA (as ``meshctl ca issue`` makes them)."""
    ca = CertificateAuthority.load(cp.state_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    issued = ca.issue(key.public_key(), service, lifetime=lifetime)
    out = tmp_path / f"client-{service}"
    out.mkdir(exist_ok=True)
    (out / "tls.crt").write_bytes(issued.pem())
    (out / "tls.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (out / "ca.crt").write_bytes(ca.roots_pem())
    return out / "tls.crt", out / "tls.key", out / "ca.crt"


def tls_get(port: int, server_name: str, cert: tuple[Path, Path] | None, ca_file: Path, path: str = "/hello"):
    ctx = ssl.create_default_context(cafile=str(ca_file))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    with httpx.Client(verify=ctx, timeout=5) as client:
        return client.get(f"https://127.0.0.1:{port}{path}", extensions={"sni_hostname": server_name})


def test_ca_issues_spiffe_certificates(secure_cp):
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ledger")]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )
    auth = {"authorization": f"Bearer {BOOTSTRAP}"}
    assert httpx.post(secure_cp.url + "/v1/ca/sign", json={"csr": csr, "service": "ledger"}).status_code == 401
    r = httpx.post(secure_cp.url + "/v1/ca/sign", json={"csr": csr, "service": "ledger"}, headers=auth)
    assert r.status_code == 200, r.text
    cert = x509.load_pem_x509_certificate(r.json()["certificate"].encode())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://mesh.local/ns/default/sa/ledger"]
    # its own name (what mesh clients check), and the one name Prometheus checks on every instance
    assert sans.get_values_for_type(x509.DNSName) == ["ledger.default.mesh", "metrics.mesh"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {o.dotted_string for o in eku} == {"1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"}
    life = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(hours=23) < life <= dt.timedelta(hours=24)
    roots = httpx.get(secure_cp.url + "/v1/ca/roots").json()["roots"]
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(roots[0].encode()))
    bad = httpx.post(secure_cp.url + "/v1/ca/sign", json={"csr": "nope", "service": "ledger"}, headers=auth)
    assert bad.status_code == 400 and "certificate signing request" in bad.json()["error"]
    bad = httpx.post(secure_cp.url + "/v1/ca/sign", json={"csr": csr, "service": "Bad Name"}, headers=auth)
    assert bad.status_code == 400


def test_strict_server_refuses_everything_but_a_valid_mesh_client(secure_cp, instances, tmp_path):
    server = start(instances, "p1", "payments", instance_env(secure_cp, tmp_path, "p1"))
    cert, key, ca_file = client_files(secure_cp, tmp_path, "frontend")
    good = tls_get(server.port, "payments.default.mesh", (cert, key), ca_file)
    assert good.status_code == 200 and good.json()["instance"] == "p1"

    def still_serves() -> None:  # a refusal is the server's choice, not a server that died
        assert tls_get(server.port, "payments.default.mesh", (cert, key), ca_file).status_code == 200

    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):  # plaintext: no TLS, no answer
        httpx.get(f"http://127.0.0.1:{server.port}/hello", timeout=5)
    still_serves()
    # TLS 1.3: the client's side of the handshake is done before the server checks its certificate, so the refusal
    # reaches the client as a closed connection (or the alert, read as an error), never as an answer
    refused = (httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectError)
    with pytest.raises(refused):  # no client certificate
        tls_get(server.port, "payments.default.mesh", None, ca_file)
    still_serves()

    other_dir = tmp_path / "other-ca"
    other = CertificateAuthority.init(other_dir)
    other_key = ec.generate_private_key(ec.SECP256R1())
    foreign = other.issue(other_key.public_key(), "frontend")
    (other_dir / "f.crt").write_bytes(foreign.pem())
    (other_dir / "f.key").write_bytes(
        other_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(refused):  # a certificate from another CA
        tls_get(server.port, "payments.default.mesh", (other_dir / "f.crt", other_dir / "f.key"), ca_file)
    still_serves()

    ca = CertificateAuthority.load(secure_cp.state_dir)
    expired_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    expired = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "frontend")]))
        .issuer_name(ca.cert.subject)
        .public_key(expired_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=2))
        .not_valid_after(now - dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://mesh.local/ns/default/sa/frontend")]),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    (tmp_path / "e.crt").write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "e.key").write_bytes(
        expired_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(refused):  # an expired certificate
        tls_get(server.port, "payments.default.mesh", (tmp_path / "e.crt", tmp_path / "e.key"), ca_file)
    still_serves()
    counts = tls_get(server.port, "payments.default.mesh", (cert, key), ca_file, "/-/count").json()
    assert counts == {"GET": 5}  # the good calls only: no refused request reached the app
    # (the wrong service answering is refused by meshlib's own client: test_mesh_clients_verify_which_service_answered)


def secure_mesh(cp, tmp_path: Path, service: str, services: dict[str, list[int]] | None = None) -> meshlib.Mesh:
    """A client Mesh with mesh TLS (the test sets MESH_BOOTSTRAP_TOKEN and friends with monkeypatch)."""
    discovery = (
        StaticDiscovery({s: [Endpoint("127.0.0.1", p) for p in ports] for s, ports in services.items()})
        if services is not None
        else f"registry://127.0.0.1:{cp.port}"
    )
    return meshlib.Mesh(
        service=service,
        discovery=discovery,
        control_plane=cp.url,
        tls="strict",
        state_dir=str(tmp_path / "clients" / service),
    )


def test_mesh_clients_verify_which_service_answered(secure_cp, instances, tmp_path, monkeypatch):
    monkeypatch.setenv("MESH_BOOTSTRAP_TOKEN", BOOTSTRAP)
    ledger = start(instances, "l1", "ledger", instance_env(secure_cp, tmp_path, "l1"))
    start(instances, "p1", "payments", instance_env(secure_cp, tmp_path, "p1"))
    # static discovery that (wrongly) lists the ledger instance as payments
    mesh = secure_mesh(secure_cp, tmp_path, "frontend", {"payments": [ledger.port], "ledger": [ledger.port]})
    with mesh, mesh.client() as client:
        assert client.get("http://ledger/hello").json()["instance"] == "l1"
        with pytest.raises(meshlib.UnavailableError, match=r"(?i)certificate|hostname"):
            client.get("http://payments/hello")
        assert client.get("http://ledger/-/count").json() == {"GET": 1}  # the payments call never reached ledger
    mesh = secure_mesh(secure_cp, tmp_path, "frontend2")
    with mesh, mesh.client() as client:
        r = client.get("http://payments/hello")
        assert r.json()["instance"] == "p1"
        assert r.json()["headers"]["x-mesh-caller"] == "frontend2"


def test_authorization_strict_and_permissive(secure_cp, instances, tmp_path, monkeypatch):
    monkeypatch.setenv("MESH_BOOTSTRAP_TOKEN", BOOTSTRAP)
    v = secure_cp.apply({"services": {"payments": {"authorization": {"mode": "strict", "allow": ["frontend"]}}}})
    start(instances, "p1", "payments", instance_env(secure_cp, tmp_path, "p1"))
    frontend = secure_mesh(secure_cp, tmp_path, "frontend")
    billing = secure_mesh(secure_cp, tmp_path, "billing")
    assert frontend.rules_watcher is not None and frontend.rules_watcher.wait_for_version(v, 5)
    with frontend, billing, frontend.client() as fc, billing.client() as bc:
        wait_for(lambda: fc.get("http://payments/-/count").status_code == 200, what="the rules at the server")
        denied = bc.post("http://payments/charge", json={"amount": 5}, headers={"x-mesh-caller": "frontend"})
        assert denied.status_code == 403
        assert "billing" in denied.json()["reason"]  # identity came from the certificate, not the header
        assert fc.get("http://payments/-/count").json().get("POST", 0) == 0  # the handler never ran
        assert fc.post("http://payments/charge", json={"amount": 5}).status_code == 200
        assert fc.get("http://payments/-/count").json()["POST"] == 1

        v = secure_cp.apply(
            {"services": {"payments": {"authorization": {"mode": "permissive", "allow": ["frontend"]}}}}
        )
        wait_for(
            lambda: bc.post("http://payments/charge", json={}).status_code == 200,
            timeout=5,
            what="permissive mode at the server",
        )
        metrics = fc.get("http://payments/-/mesh/metrics").text
        assert (
            'mesh_server_authz_denied_total{mesh_service="payments",mesh_peer_service="billing",mesh_authz_mode="permissive"}'
            in metrics
        )
        assert 'mesh_authz_mode="strict"' in metrics


def test_rotation_under_continuous_load_fails_nothing(secure_cp, instances, tmp_path, monkeypatch):
    monkeypatch.setenv("MESH_BOOTSTRAP_TOKEN", BOOTSTRAP)
    env = instance_env(secure_cp, tmp_path, "p1", MESH_TLS_CERT_LIFETIME="3s")
    start(instances, "p1", "payments", env)
    start(instances, "p2", "payments", instance_env(secure_cp, tmp_path, "p2", MESH_TLS_CERT_LIFETIME="3s"))
    monkeypatch.setenv("MESH_TLS_CERT_LIFETIME", "3s")
    mesh = secure_mesh(secure_cp, tmp_path, "frontend")
    results: list[object] = []
    stop = threading.Event()
    with mesh, mesh.client() as client:
        wait_for(lambda: len(mesh.service_state("payments").handles) == 2, what="both instances")

        def load() -> None:
            while not stop.is_set():
                try:
                    results.append(client.get("http://payments/hello").status_code)
                except Exception as exc:
                    results.append(exc)

        def fresh() -> None:  # new connections (new handshakes) all along, not only the pooled ones
            while not stop.is_set():
                with mesh.client() as c:
                    try:
                        results.append(c.get("http://payments/hello").status_code)
                    except Exception as exc:
                        results.append(exc)
                time.sleep(0.05)

        threads = [threading.Thread(target=load), threading.Thread(target=fresh)]
        for t in threads:
            t.start()
        assert mesh.identity is not None
        first = mesh.identity.certificate
        wait_for(lambda: mesh.identity.rotations >= 4, timeout=90, what="three client rotations")  # type: ignore[union-attr]
        stop.set()
        for t in threads:
            t.join(10)
        assert mesh.identity.certificate is not None and first is not None
        assert mesh.identity.certificate.serial_number != first.serial_number
        metrics = client.get("http://payments/-/mesh/metrics").text
    failures = [r for r in results if r != 200]
    assert failures == [] and len(results) > 100, failures[:3]
    expiry = [line for line in metrics.splitlines() if line.startswith("mesh_certificate_time_to_expiry_seconds")]
    assert expiry and 0 < float(expiry[0].split()[-1]) <= 3.5  # the server renewed too (else it would be negative)


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("openssl") is None, reason="needs curl and openssl")
def test_curl_and_openssl_interoperate(secure_cp, instances, tmp_path):
    server = start(instances, "p1", "payments", instance_env(secure_cp, tmp_path, "p1"))
    out = tmp_path / "issued"
    import sys

    issue = subprocess.run(
        [
            sys.executable,
            "-m",
            "meshlib.cli",
            "ca",
            "issue",
            "curl-client",
            "--state-dir",
            str(secure_cp.state_dir),
            "--out-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert issue.returncode == 0, issue.stderr
    cert, key, ca_file = out / "curl-client.crt", out / "curl-client.key", out / "ca.crt"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    r = subprocess.run(
        [
            "curl",
            "-sS",
            "--cert",
            str(cert),
            "--key",
            str(key),
            "--cacert",
            str(ca_file),
            "--resolve",
            f"payments.default.mesh:{server.port}:127.0.0.1",
            f"https://payments.default.mesh:{server.port}/hello",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["instance"] == "p1"
    r = subprocess.run(
        [
            "curl",
            "-sS",
            "--cacert",
            str(ca_file),
            "--resolve",
            f"payments.default.mesh:{server.port}:127.0.0.1",
            f"https://payments.default.mesh:{server.port}/hello",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode != 0  # no client certificate: refused
    s = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{server.port}",
            "-servername",
            "payments.default.mesh",
            "-cert",
            str(cert),
            "-key",
            str(key),
            "-CAfile",
            str(ca_file),
            "-verify_hostname",
            "payments.default.mesh",
            "-verify_return_error",
            "-quiet",
        ],
        input="GET /hello HTTP/1.1\r\nHost: payments\r\nConnection: close\r\n\r\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert s.returncode == 0, s.stderr
    assert "HTTP/1.1 200" in s.stdout and '"instance": "p1"' in s.stdout


def test_permissive_accepts_plaintext_and_mtls_on_one_port(secure_cp, instances, tmp_path):
    server = start(instances, "p1", "payments", instance_env(secure_cp, tmp_path, "p1", mode="permissive"))
    plain = httpx.get(f"http://127.0.0.1:{server.port}/hello", timeout=5)
    assert plain.status_code == 200
    cert, key, ca_file = client_files(secure_cp, tmp_path, "frontend")
    secure = tls_get(server.port, "payments.default.mesh", (cert, key), ca_file)
    assert secure.status_code == 200 and secure.json()["instance"] == "p1"
    anonymous_tls = tls_get(server.port, "payments.default.mesh", None, ca_file)  # TLS, no client cert
    assert anonymous_tls.status_code == 200


def test_bring_your_own_intermediate_ca(tmp_path):
    root_dir = tmp_path / "root"
    root = CertificateAuthority.init(root_dir, "corp.example")
    inter_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    inter = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mesh intermediate")]))
        .issuer_name(root.cert.subject)
        .public_key(inter_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root.key, hashes.SHA256())
    )
    (tmp_path / "inter.crt").write_bytes(inter.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "inter.key").write_bytes(
        inter_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    ca = CertificateAuthority.from_files(
        tmp_path / "inter.crt", tmp_path / "inter.key", root_dir / "ca.crt", "corp.example"
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    issued = ca.issue(leaf_key.public_key(), "payments")
    assert issued.chain == [inter]
    issued.certificate.verify_directly_issued_by(inter)
    inter.verify_directly_issued_by(root.cert)
    assert ca.roots == [root.cert]
    with pytest.raises(meshlib.ConfigurationError, match="not the private key"):
        CertificateAuthority.from_files(tmp_path / "inter.crt", root_dir / "ca.key", root_dir / "ca.crt")
    with pytest.raises(meshlib.ConfigurationError, match="give its root"):
        CertificateAuthority.from_files(tmp_path / "inter.crt", tmp_path / "inter.key", None)
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(meshlib.ConfigurationError, match="not a PEM certificate"):
        CertificateAuthority.from_files(tmp_path / "junk.pem", tmp_path / "inter.key", None)


def test_tls_without_a_ca_is_a_clear_error(tmp_path):
    with pytest.raises(meshlib.MeshError, match=r"MESH_CONTROL_PLANE|cannot reach the CA"):
        meshlib.Mesh(
            service="lonely",
            discovery="static:",
            control_plane="",
            tls="strict",
            state_dir=str(tmp_path),
            settings=None,
        )
