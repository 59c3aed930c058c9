"""Attack and hygiene around keys and the CA: weak keys are not signed, key files are private, instance keys do not
outlive their use on disk, and refused TLS handshakes are visible in the log."""

from __future__ import annotations

import logging
import os
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

import meshlib
from harness import ThreadedServer, wait_for
from meshlib.discovery import StaticDiscovery
from meshlib.security.ca import CertificateAuthority

pytestmark = pytest.mark.e2e  # its tests start processes (servers, a control plane, meshctl)

TOKEN = "keys-bootstrap"


def csr_pem(key: object) -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "payments")]))
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def sign(cp, key: object) -> httpx.Response:
    return httpx.post(
        cp.url + "/v1/ca/sign",
        json={"csr": csr_pem(key), "service": "payments"},
        headers={"authorization": f"Bearer {TOKEN}"},
    )


@pytest.mark.parametrize(
    ("make_key", "accepted", "message"),
    [
        (lambda: rsa.generate_private_key(65537, 1024), False, "RSA key of 1024 bits is too weak"),
        (lambda: ec.generate_private_key(ec.SECP192R1()), False, "secp192r1"),
        (lambda: ec.generate_private_key(ec.SECP256K1()), False, "secp256k1"),
        (lambda: ec.generate_private_key(ec.SECP256R1()), True, ""),
        (lambda: ec.generate_private_key(ec.SECP384R1()), True, ""),
        (lambda: rsa.generate_private_key(65537, 2048), True, ""),
    ],
)
def test_the_ca_signs_only_strong_keys(control_plane, make_key, accepted, message):
    cp = control_plane(bootstrap_token=TOKEN)
    r = sign(cp, make_key())
    if accepted:
        assert r.status_code == 200, r.text
    else:
        assert r.status_code == 400 and message in r.json()["error"], r.text


def test_ca_issue_writes_the_key_0600_even_over_an_existing_file(tmp_path):
    CertificateAuthority.init(tmp_path / "ca")
    out = tmp_path / "out"
    out.mkdir()
    key = out / "payments.key"
    key.write_text("old")
    key.chmod(0o644)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "meshlib.cli",
            "ca",
            "issue",
            "payments",
            "--state-dir",
            str(tmp_path / "ca"),
            "--out-dir",
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert b"PRIVATE KEY" in key.read_bytes()


def private_key_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]


def test_instance_keys_are_not_left_on_disk(control_plane, tmp_path, monkeypatch):
    monkeypatch.setenv("MESH_BOOTSTRAP_TOKEN", TOKEN)
    cp = control_plane(bootstrap_token=TOKEN)
    state = tmp_path / "instance"
    mesh = meshlib.Mesh(
        service="payments", discovery=StaticDiscovery({}), control_plane=cp.url, tls="strict", state_dir=str(state)
    )
    try:
        assert mesh.identity is not None and mesh.identity.certificate is not None
        assert private_key_files(state) == []  # in memory (the SSL contexts) only, while it runs
        mesh.identity.refresh()  # a rotation writes and removes it again
        assert private_key_files(state) == []
    finally:
        mesh.close()
    assert private_key_files(state) == []


def test_refused_handshakes_are_logged_with_the_reason(control_plane, tmp_path, monkeypatch, caplog):
    from meshlib.server import mesh_uvicorn_config

    monkeypatch.setenv("MESH_BOOTSTRAP_TOKEN", TOKEN)
    cp = control_plane(bootstrap_token=TOKEN)
    mesh = meshlib.Mesh(
        service="payments",
        discovery=StaticDiscovery({}),
        control_plane=cp.url,
        tls="permissive",
        state_dir=str(tmp_path / "p"),
    )
    config = mesh_uvicorn_config(_hello_app, mesh, log_level="warning", lifespan="off")
    server = ThreadedServer(None, config_object=config)
    caplog.set_level(logging.INFO, logger="meshlib.security")
    try:
        foreign = CertificateAuthority.init(tmp_path / "foreign")
        key = ec.generate_private_key(ec.SECP256R1())
        issued = foreign.issue(key.public_key(), "frontend")
        (tmp_path / "f.crt").write_bytes(issued.pem())
        (tmp_path / "f.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.load_cert_chain(str(tmp_path / "f.crt"), str(tmp_path / "f.key"))
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"https://127.0.0.1:{server.port}/", verify=ctx, timeout=5).raise_for_status()
        wait_for(
            lambda: any("TLS handshake failed" in r.getMessage() for r in caplog.records),
            what="the refused handshake to be logged",
        )
        line = next(r for r in caplog.records if "TLS handshake failed" in r.getMessage())
        assert line.levelno == logging.INFO and "certificate" in line.getMessage().lower()
        assert httpx.get(f"http://127.0.0.1:{server.port}/", timeout=5).status_code == 200  # still serving
    finally:
        server.stop()
        mesh.close()


async def _hello_app(scope, receive, send):  # type: ignore[no-untyped-def]
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})
