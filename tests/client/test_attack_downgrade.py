"""Attack: make a strict mTLS client talk plaintext. A forged registration that advertises ``mesh_tls: off`` in front
of a plaintext server must get zero requests from a ``MESH_TLS=strict`` client; the call fails saying why. And the
control plane itself can be served over https, verified against the mesh CA."""

from __future__ import annotations

import httpx
import pytest

import meshlib
from harness import Upstream, wait_for

pytestmark = pytest.mark.e2e  # its tests start processes (servers, a control plane, meshctl)

BOOTSTRAP = "downgrade-bootstrap"


def _register(cp, service: str, port: int, mesh_tls: str) -> None:
    r = httpx.put(
        cp.url + "/v1/registry/register",
        json={"service": service, "address": "127.0.0.1", "port": port, "meta": {"mesh_tls": mesh_tls}, "ttl": "60s"},
        headers={"authorization": f"Bearer {BOOTSTRAP}"},
        verify=cp.verify,
    )
    assert r.status_code == 200, r.text


def _mesh(cp, tls: str, tmp_path, name: str = "caller") -> meshlib.Mesh:
    return meshlib.Mesh(
        service=name,
        discovery=f"registry://127.0.0.1:{cp.port}",
        control_plane=cp.url,
        tls=tls,
        state_dir=str(tmp_path / name),
    )


@pytest.fixture
def plaintext_attacker(upstreams) -> Upstream:
    """The attacker's server: plain HTTP, counting every request it gets."""
    return upstreams(1, prefix="attacker")[0]


def test_strict_client_never_sends_plaintext_to_a_forged_instance(
    control_plane, plaintext_attacker, tmp_path, monkeypatch
):
    monkeypatch.setenv("MESH_BOOTSTRAP_TOKEN", BOOTSTRAP)
    cp = control_plane(bootstrap_token=BOOTSTRAP)
    _register(cp, "payments", plaintext_attacker.port, "off")  # forged: "I am payments, speak plaintext to me"
    mesh = _mesh(cp, "strict", tmp_path)
    with mesh, mesh.client() as client, pytest.raises(meshlib.NoEndpointsError) as info:
        client.get("http://payments/charge")
    message = str(info.value)
    assert "mesh_tls: off" in message and "MESH_TLS=strict" in message
    assert f"127.0.0.1:{plaintext_attacker.port}" in message
    assert plaintext_attacker.counts() == {}  # not one byte of a request reached it


def test_strict_client_skips_plaintext_instances_and_uses_the_mtls_ones(
    control_plane, plaintext_attacker, tmp_path, monkeypatch
):
    monkeypatch.setenv("MESH_BOOTSTRAP_TOKEN", BOOTSTRAP)
    cp = control_plane(bootstrap_token=BOOTSTRAP)
    env = {
        "MESH_CONTROL_PLANE": cp.url,
        "MESH_DISCOVERY": f"registry://127.0.0.1:{cp.port}",
        "MESH_TLS": "strict",
        "MESH_BOOTSTRAP_TOKEN": BOOTSTRAP,
        "MESH_STATE_DIR": str(tmp_path / "real"),
    }
    real = Upstream("real", mesh_service="payments", env=env).wait_listening()
    try:
        _register(cp, "payments", plaintext_attacker.port, "off")
        with _mesh(cp, "strict", tmp_path) as mesh, mesh.client() as client:
            wait_for(
                lambda: len(httpx.get(cp.url + "/v1/registry/services/payments").json()["instances"]) == 2,
                what="both registrations",
            )
            for _ in range(30):
                r = client.get("http://payments/charge")
                assert r.status_code == 200 and r.json()["instance"] == "real"
        assert plaintext_attacker.counts() == {}
    finally:
        real.stop()


def test_permissive_client_may_honour_plaintext_instances(control_plane, plaintext_attacker, tmp_path, monkeypatch):
    """The other side of the rule: a permissive client (migrating to mTLS) still reaches plaintext instances."""
    monkeypatch.setenv("MESH_BOOTSTRAP_TOKEN", BOOTSTRAP)
    cp = control_plane(bootstrap_token=BOOTSTRAP)
    _register(cp, "legacy", plaintext_attacker.port, "off")
    with _mesh(cp, "permissive", tmp_path) as mesh, mesh.client() as client:
        assert client.get("http://legacy/x").status_code == 200
    assert plaintext_attacker.counts() == {"GET": 1}


def test_control_plane_over_https_verified_with_the_mesh_ca(control_plane, tmp_path, monkeypatch):
    monkeypatch.setenv("MESH_BOOTSTRAP_TOKEN", BOOTSTRAP)
    cp = control_plane(bootstrap_token=BOOTSTRAP, extra_args=("--tls",))
    assert cp.url.startswith("https://")
    roots = str(cp.state_dir / "ca-roots.pem")
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # not trusted without the mesh CA
        httpx.get(cp.url + "/healthz")
    monkeypatch.setenv("MESH_CONTROL_PLANE_CA", roots)
    r = httpx.put(
        cp.url + "/v1/rules", json={"services": {"payments": {"timeout": "2s"}}}, headers=cp.admin(), verify=cp.verify
    )
    assert r.status_code == 200
    # identity (CSR), rules and registry all go over https, verified against MESH_CONTROL_PLANE_CA
    with _mesh(cp, "strict", tmp_path) as mesh:
        assert mesh.identity is not None and mesh.identity.certificate is not None
        assert mesh.rules_watcher is not None and mesh.rules_watcher.wait_for_version(r.json()["version"], 10)
        registration = mesh.discovery.register("caller", "127.0.0.1", 9, meta={"mesh_tls": "strict"}).start()
        assert registration.registered
        listed = httpx.get(cp.url + "/v1/registry/services/caller", verify=cp.verify).json()["instances"]
        assert [i["port"] for i in listed] == [9]
        registration.close()


def test_a_missing_control_plane_ca_file_is_a_clear_error(tmp_path):
    with pytest.raises(meshlib.ConfigurationError, match=r"MESH_CONTROL_PLANE_CA=.*no such file"):
        meshlib.MeshSettings.from_env({"MESH_CONTROL_PLANE_CA": str(tmp_path / "nope.pem")})


def test_a_ca_file_of_another_mesh_is_said_at_once_with_the_variable_to_check(control_plane, tmp_path, monkeypatch):
    """The instance must not retry for half a minute, nor heartbeat unregistered for ever, on a CA file that can
    never verify the control plane: one error, naming MESH_CONTROL_PLANE_CA."""
    from meshlib.errors import RegistrationRefused
    from meshlib.security.ca import CertificateAuthority
    from meshlib.security.identity import IdentityConfigError

    monkeypatch.setenv("MESH_BOOTSTRAP_TOKEN", BOOTSTRAP)
    cp = control_plane(bootstrap_token=BOOTSTRAP, extra_args=("--tls",))
    other = CertificateAuthority.init(tmp_path / "other-mesh")
    wrong = tmp_path / "other-roots.pem"
    wrong.write_bytes(other.roots_pem())
    monkeypatch.setenv("MESH_CONTROL_PLANE_CA", str(wrong))
    with pytest.raises(IdentityConfigError, match="check MESH_CONTROL_PLANE_CA") as info:
        _mesh(cp, "strict", tmp_path)
    assert "CERTIFICATE_VERIFY_FAILED" not in str(info.value)
    with _mesh(cp, "off", tmp_path) as mesh, pytest.raises(RegistrationRefused) as refused:
        mesh.discovery.register("caller", "127.0.0.1", 9).start()
    assert "check MESH_CONTROL_PLANE_CA" in str(refused.value) and "ca-roots.pem" in str(refused.value)


def test_instances_skipped_for_mtls_are_not_said_to_be_gone(control_plane, plaintext_attacker, tmp_path, monkeypatch):
    monkeypatch.setenv("MESH_BOOTSTRAP_TOKEN", BOOTSTRAP)
    cp = control_plane(bootstrap_token=BOOTSTRAP)
    _register(cp, "payments", plaintext_attacker.port, "off")
    refused = pytest.raises(meshlib.NoEndpointsError)
    with _mesh(cp, "strict", tmp_path) as mesh, mesh.client() as client, refused as info:
        client.get("http://payments/charge")
    assert info.value.reason == meshlib.NoEndpointsError.ALL_SKIPPED
    assert "no endpoint this process can call" in str(info.value)
    assert "none of its instances is there" not in str(info.value) and "discovery lists none" not in str(info.value)
