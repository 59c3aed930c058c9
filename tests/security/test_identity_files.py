"""Identities from files (``MESH_TLS_CERT/KEY/CA``, for users with their own PKI) and their reload, and what an
instance does when renewal from the CA fails: backoff, WARNING, then ERROR as expiry nears."""

from __future__ import annotations

import itertools
import logging
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

import meshlib
from harness import ThreadedServer, wait_for
from meshlib.discovery import StaticDiscovery
from meshlib.security.ca import CertificateAuthority

pytestmark = pytest.mark.e2e  # its tests start processes (servers, a control plane, meshctl)

BOOTSTRAP = "identity-bootstrap"


def issue(ca_dir: Path, out: Path, service: str = "payments") -> int:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "meshlib.cli",
            "ca",
            "issue",
            service,
            "--state-dir",
            str(ca_dir),
            "--out-dir",
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return x509.load_pem_x509_certificate((out / f"{service}.crt").read_bytes()).serial_number


def presented_serial(port: int, files: Path) -> int:
    """The serial of the certificate a strict server presents on a new connection (we are a mesh client too)."""
    ctx = ssl.create_default_context(cafile=str(files / "ca.crt"))
    ctx.load_cert_chain(str(files / "payments.crt"), str(files / "payments.key"))
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        ctx.wrap_socket(raw, server_hostname="payments.default.mesh") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def _ok_app(scope, receive, send):  # type: ignore[no-untyped-def]
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def test_certificate_files_are_used_and_reloaded_when_they_change(tmp_path, monkeypatch):
    from meshlib.server import mesh_uvicorn_config

    CertificateAuthority.init(tmp_path / "ca")
    files = tmp_path / "files"
    first = issue(tmp_path / "ca", files)
    monkeypatch.setenv("MESH_TLS_CERT", str(files / "payments.crt"))
    monkeypatch.setenv("MESH_TLS_KEY", str(files / "payments.key"))
    monkeypatch.setenv("MESH_TLS_CA", str(files / "ca.crt"))
    mesh = meshlib.Mesh(
        service="payments",
        discovery=StaticDiscovery({}),
        control_plane="",
        tls="strict",
        state_dir=str(tmp_path / "state"),
    )
    server = ThreadedServer(None, config_object=mesh_uvicorn_config(_ok_app, mesh, log_level="warning"))
    try:
        assert mesh.identity is not None and mesh.identity.certificate is not None
        assert mesh.identity.certificate.serial_number == first
        assert presented_serial(server.port, files) == first
        second = issue(tmp_path / "ca", files)  # cert-manager or Vault agent rewrote the files
        assert second != first
        wait_for(
            lambda: mesh.identity.certificate.serial_number == second,
            timeout=15,  # type: ignore[union-attr]
            what="the new files to be loaded",
        )
        assert presented_serial(server.port, files) == second  # new handshakes get the new certificate
    finally:
        server.stop()
        mesh.close()


def test_certificate_files_go_together(tmp_path, monkeypatch):
    monkeypatch.setenv("MESH_TLS_CERT", str(tmp_path / "x.crt"))
    with pytest.raises(meshlib.ConfigurationError, match="MESH_TLS_CERT, MESH_TLS_KEY and MESH_TLS_CA go together"):
        meshlib.Mesh(
            service="payments",
            discovery=StaticDiscovery({}),
            control_plane="",
            tls="strict",
            state_dir=str(tmp_path / "state"),
        )


def test_failed_renewals_back_off_and_escalate_to_error(control_plane, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MESH_BOOTSTRAP_TOKEN", BOOTSTRAP)
    monkeypatch.setenv("MESH_TLS_CERT_LIFETIME", "8s")
    cp = control_plane(bootstrap_token=BOOTSTRAP)
    caplog.set_level(logging.INFO, logger="meshlib.identity")
    mesh = meshlib.Mesh(
        service="payments",
        discovery=StaticDiscovery({}),
        control_plane=cp.url,
        tls="strict",
        state_dir=str(tmp_path / "state"),
    )
    try:
        cp.kill()  # the CA is gone before the first renewal (at 2/3 of 8 s)

        def failures() -> list[logging.LogRecord]:
            return [r for r in caplog.records if "renewal failed" in r.getMessage()]

        wait_for(
            lambda: any(r.levelno == logging.ERROR for r in failures()), timeout=30, what="an ERROR once expiry is near"
        )
        records = failures()
        assert records[0].levelno == logging.WARNING  # first a warning, while there is time left
        assert "cannot reach the CA at " + cp.url in records[0].getMessage()
        gaps = [b.created - a.created for a, b in itertools.pairwise(records)]
        assert len(gaps) >= 1, gaps
        # backoff: 1 s, 2 s, 4 s, ... between attempts (never sooner; a slow machine only makes them longer)
        for n, gap in enumerate(gaps):
            assert gap >= 0.5 * 2 ** (n + 1) * 0.9, gaps
    finally:
        mesh.close()


def test_a_state_directory_keeps_one_identity_folder_per_live_process(tmp_path: Path) -> None:
    """Issue 31: a process killed before it cleans up used to leave its ``identity-*`` folder (key included)
    behind for good: 72 after one afternoon. A new one now removes those of processes that are gone."""
    import os
    import time

    from meshlib.security.identity import STALE_AFTER, private_dir

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(30)
    state = tmp_path / "state"
    state.mkdir()
    (state / f"identity-{dead.pid}-abc").mkdir()
    (state / f"identity-{dead.pid}-abc" / "key.pem").write_text("secret")
    alive = state / f"identity-{os.getpid()}-def"
    alive.mkdir()
    old = state / "identity-k2j3h4g5"  # the earlier naming, untouched for longer than any renewal
    old.mkdir()
    os.utime(old, (time.time() - STALE_AFTER - 60,) * 2)
    recent = state / "identity-q9w8e7r6"
    recent.mkdir()
    made = private_dir(state)
    assert made.name.startswith(f"identity-{os.getpid()}-")
    assert sorted(p.name for p in state.iterdir()) == sorted([alive.name, recent.name, made.name])
