"""gRPC and mesh mTLS: identities from files signed by a test CA, real TLS handshakes on loopback, authorization
from the rules before the handler runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import grpc
import meshlib
import meshlib.grpc
from grpc_support import Behaviour, make_servicer, stubs
from meshlib.discovery import StaticDiscovery
from meshlib.endpoints import Endpoint
from meshlib.rules.model import validate_rules
from meshlib.security.ca import CertificateAuthority

pb2, pb2_grpc = stubs()


def issue(ca: CertificateAuthority, out: Path, service: str) -> dict[str, str]:
    """Key, certificate and roots for ``service`` as files; the MESH_TLS_* variables that name them."""
    key = ec.generate_private_key(ec.SECP256R1())
    issued = ca.issue(key.public_key(), service)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{service}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (out / f"{service}.crt").write_bytes(issued.pem() + issued.chain_pem())
    (out / "ca.crt").write_bytes(ca.roots_pem())
    return {
        "MESH_TLS_CERT": str(out / f"{service}.crt"),
        "MESH_TLS_KEY": str(out / f"{service}.key"),
        "MESH_TLS_CA": str(out / "ca.crt"),
    }


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca")


def tls_mesh(
    monkeypatch: pytest.MonkeyPatch,
    files: dict[str, str],
    service: str,
    mode: str,
    services: dict[str, list[Endpoint]] | None = None,
    tmp: Path | None = None,
) -> meshlib.Mesh:
    with monkeypatch.context() as env:
        for key, value in files.items():
            env.setenv(key, value)
        return meshlib.Mesh(
            service=service,
            discovery=StaticDiscovery(services or {}),
            control_plane="",
            tls=mode,
            telemetry=False,
            state_dir=str(tmp) if tmp else None,
        )


class Strict:
    """An Echo instance serving strict mTLS as ``echo``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, ca: CertificateAuthority, tmp: Path, mode: str = "strict"):
        self.behaviour = Behaviour("a")
        self.mesh = tls_mesh(monkeypatch, issue(ca, tmp / "echo", "echo"), "echo", mode, tmp=tmp / "echo-state")
        self.server = meshlib.grpc.server(mesh=self.mesh, port=0, drain_delay=0)
        pb2_grpc.add_EchoServicer_to_server(make_servicer(self.behaviour), self.server)
        self.server.start()
        self.endpoint = Endpoint("127.0.0.1", self.server.port)

    def stop(self) -> None:
        self.server.stop(0).wait(10)


@pytest.fixture
def strict(monkeypatch: pytest.MonkeyPatch, ca: CertificateAuthority, tmp_path: Path) -> Any:
    server = Strict(monkeypatch, ca, tmp_path)
    yield server
    server.stop()


def test_a_mesh_client_calls_a_strict_server_which_sees_its_identity(monkeypatch, ca, tmp_path, strict):
    client = tls_mesh(
        monkeypatch,
        issue(ca, tmp_path / "front", "front"),
        "front",
        "strict",
        {"echo": [strict.endpoint]},
        tmp=tmp_path / "front-state",
    )
    # insecure_channel: the application brings no credentials; the mesh still makes every hop mTLS
    stub = pb2_grpc.EchoStub(meshlib.grpc.insecure_channel("echo", mesh=client))
    reply = stub.Say(pb2.Hello(text="hi"))
    assert reply.peer == "spiffe://mesh.local/ns/default/sa/front"
    secure = pb2_grpc.EchoStub(meshlib.grpc.secure_channel("echo", mesh=client))
    assert secure.Collect(iter([pb2.Hello(text="a")])).peer == "spiffe://mesh.local/ns/default/sa/front"


def test_strict_refuses_a_plaintext_client(strict):
    stub = pb2_grpc.EchoStub(grpc.insecure_channel(f"127.0.0.1:{strict.endpoint.port}"))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Say(pb2.Hello(text="hi"), timeout=5)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert strict.behaviour.calls == 0


def test_strict_refuses_a_client_of_another_ca(monkeypatch, tmp_path, strict):
    foreign = CertificateAuthority.init(tmp_path / "foreign-ca")
    files = issue(foreign, tmp_path / "foreign", "front")
    roots = Path(strict.mesh.identity.dir / "roots.pem").read_bytes()  # it trusts the server; the server won't trust it
    credentials = grpc.ssl_channel_credentials(
        root_certificates=roots,
        private_key=Path(files["MESH_TLS_KEY"]).read_bytes(),
        certificate_chain=Path(files["MESH_TLS_CERT"]).read_bytes(),
    )
    channel = grpc.secure_channel(
        f"127.0.0.1:{strict.endpoint.port}",
        credentials,
        options=[("grpc.ssl_target_name_override", "echo.default.mesh")],
    )
    with pytest.raises(grpc.RpcError) as caught:
        pb2_grpc.EchoStub(channel).Say(pb2.Hello(text="hi"), timeout=5)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert strict.behaviour.calls == 0


def test_a_client_verifies_the_server_identity(monkeypatch, ca, tmp_path):
    """A server holding a valid mesh certificate for *another* service is refused by the client."""
    impostor = Behaviour("impostor")
    mesh = tls_mesh(monkeypatch, issue(ca, tmp_path / "other", "other"), "other", "strict", tmp=tmp_path / "o")
    server = meshlib.grpc.server(mesh=mesh, port=0, drain_delay=0)
    pb2_grpc.add_EchoServicer_to_server(make_servicer(impostor), server)
    server.start()
    try:
        client = tls_mesh(
            monkeypatch,
            issue(ca, tmp_path / "front", "front"),
            "front",
            "strict",
            {"echo": [Endpoint("127.0.0.1", server.port)]},
            tmp=tmp_path / "f",
        )
        with pytest.raises(grpc.RpcError) as caught:
            pb2_grpc.EchoStub(client.grpc_channel("echo")).Say(pb2.Hello(text="hi"), timeout=5)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert impostor.calls == 0
    finally:
        server.stop(0).wait(10)


def test_strict_client_never_sends_plaintext_to_an_instance_advertising_it(monkeypatch, ca, tmp_path):
    client = tls_mesh(
        monkeypatch,
        issue(ca, tmp_path / "front", "front"),
        "front",
        "strict",
        {"echo": [Endpoint("127.0.0.1", 9, meta={"mesh_tls": "off"})]},
        tmp=tmp_path / "f",
    )
    with pytest.raises(grpc.RpcError) as caught:
        pb2_grpc.EchoStub(client.grpc_channel("echo")).Say(pb2.Hello(text="hi"), timeout=5)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "MESH_TLS=strict never sends plaintext" in caught.value.details()


def test_an_unauthorized_identity_gets_permission_denied_and_the_handler_never_runs(monkeypatch, ca, tmp_path, strict):
    strict.mesh.apply_rules(validate_rules({"services": {"echo": {"authorization": {"allow": ["billing"]}}}}, 2))
    outsider = tls_mesh(
        monkeypatch,
        issue(ca, tmp_path / "front", "front"),
        "front",
        "strict",
        {"echo": [strict.endpoint]},
        tmp=tmp_path / "f",
    )
    stub = pb2_grpc.EchoStub(outsider.grpc_channel("echo"))
    for call in (
        lambda: stub.Say(pb2.Hello(text="x")),
        lambda: list(stub.Count(pb2.Hello(text="x", n=2))),
        lambda: stub.Collect(iter([pb2.Hello(text="x")])),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "front" in caught.value.details()
    assert strict.behaviour.calls == 0, "the handler never ran"
    billing = tls_mesh(
        monkeypatch,
        issue(ca, tmp_path / "billing", "billing"),
        "billing",
        "strict",
        {"echo": [strict.endpoint]},
        tmp=tmp_path / "b",
    )
    assert pb2_grpc.EchoStub(billing.grpc_channel("echo")).Say(pb2.Hello(text="ok")).text == "ok"
    assert strict.behaviour.calls == 1


def test_a_permissive_server_sees_its_callers_identity_and_refuses_certificate_less_tls(monkeypatch, ca, tmp_path):
    """A permissive gRPC server once never asked for client certificates, so a valid mesh caller arrived without
    an identity and authorization denied it. grpcio cannot request a certificate without requiring one, and the
    permissive gRPC port is TLS-only anyway: it requires one, as strict does."""
    server = Strict(monkeypatch, ca, tmp_path, mode="permissive")
    try:
        server.mesh.apply_rules(validate_rules({"services": {"echo": {"authorization": {"allow": ["front"]}}}}, 2))
        front = tls_mesh(
            monkeypatch,
            issue(ca, tmp_path / "front", "front"),
            "front",
            "permissive",
            {"echo": [server.endpoint]},
            tmp=tmp_path / "f",
        )
        reply = pb2_grpc.EchoStub(front.grpc_channel("echo")).Say(pb2.Hello(text="hi"), timeout=5)
        assert reply.peer == "spiffe://mesh.local/ns/default/sa/front"
        channel = grpc.secure_channel(
            f"127.0.0.1:{server.endpoint.port}",
            grpc.ssl_channel_credentials(root_certificates=ca.roots_pem()),
            options=[("grpc.ssl_target_name_override", "echo.default.mesh")],
        )
        with pytest.raises(grpc.RpcError) as caught:
            pb2_grpc.EchoStub(channel).Say(pb2.Hello(text="hi"), timeout=5)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def presented_serial(port: int, files: dict[str, str]) -> int:
    """The serial of the certificate the server presents on a new TLS connection (we hold a mesh identity)."""
    import socket
    import ssl

    from cryptography import x509

    ctx = ssl.create_default_context(cafile=files["MESH_TLS_CA"])
    ctx.load_cert_chain(files["MESH_TLS_CERT"], files["MESH_TLS_KEY"])
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="echo.default.mesh") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_certificate_rotation_on_both_sides_drops_no_call(monkeypatch, ca, tmp_path, strict):
    import threading

    front_files = issue(ca, tmp_path / "front", "front")
    client = tls_mesh(monkeypatch, front_files, "front", "strict", {"echo": [strict.endpoint]}, tmp=tmp_path / "f")
    channel = client.grpc_channel("echo")
    stub = pb2_grpc.EchoStub(channel)
    assert stub.Say(pb2.Hello(text="before")).text == "before"
    first_server_serial = presented_serial(strict.endpoint.port, front_files)
    slow: dict[str, Any] = {}

    def long_call() -> None:
        try:
            slow["reply"] = stub.Say(pb2.Hello(text="slow", mode="slow", n=1500), timeout=10)
        except grpc.RpcError as exc:
            slow["error"] = exc

    strict.behaviour.handled.clear()
    caller = threading.Thread(target=long_call)
    caller.start()
    assert strict.behaviour.handled.wait(10)
    # both identities rotate while the call is in flight: new files, reloaded
    issue(ca, tmp_path / "front", "front")
    client.identity.refresh()
    issue(ca, tmp_path / "echo", "echo")
    strict.mesh.identity.refresh()
    assert client.identity.rotations == 2 and strict.mesh.identity.rotations == 2
    # new calls use the new client certificate on a new channel; new handshakes get the new server certificate
    assert stub.Say(pb2.Hello(text="after")).peer == "spiffe://mesh.local/ns/default/sa/front"
    assert [r.generation for r in channel.endpoints._live.values()] == [2]
    assert presented_serial(strict.endpoint.port, front_files) != first_server_serial
    caller.join(10)
    assert "error" not in slow, f"the call in flight was dropped: {slow.get('error')}"
    assert not channel.endpoints.retiring(), "the old channel closed after its last call"


def test_strict_refuses_tls_without_a_client_certificate(strict, ca):
    channel = grpc.secure_channel(
        f"127.0.0.1:{strict.endpoint.port}",
        grpc.ssl_channel_credentials(root_certificates=ca.roots_pem()),
        options=[("grpc.ssl_target_name_override", "echo.default.mesh")],
    )
    with pytest.raises(grpc.RpcError) as caught:
        pb2_grpc.EchoStub(channel).Say(pb2.Hello(text="hi"), timeout=5)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert strict.behaviour.calls == 0
