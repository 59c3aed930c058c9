"""The entry points a user touches first: settings from the environment, the process default Mesh, ``static:``
discovery, and the ``meshctl`` commands ``run`` (with a WSGI app), ``rules validate`` and ``ca init``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
from cryptography import x509

import meshlib
from harness import free_port, wait_for
from meshlib.discovery.static import parse_static_spec
from meshlib.settings import MeshSettings


def meshctl(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "meshlib.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


# -- settings ----------------------------------------------------------------------------------------


def test_settings_come_from_the_environment_then_defaults(tmp_path):
    env = {
        "MESH_SERVICE": "checkout",
        "MESH_DISCOVERY": "static:payments=127.0.0.1:8001",
        "MESH_CONTROL_PLANE": "",
        "MESH_TLS": "permissive",
        "MESH_STATE_DIR": str(tmp_path),
        "MESH_TRUST_DOMAIN": "corp.example",
        "MESH_NAMESPACE": "shop",
        "MESH_TELEMETRY": "off",
        "MESH_ACCESS_LOG": "on",
        "MESH_ACCESS_LOG_SAMPLE": "0.25",
    }
    s = MeshSettings.from_env(env)
    assert (s.service, s.discovery, s.control_plane, s.tls) == (
        "checkout",
        "static:payments=127.0.0.1:8001",
        "",
        "permissive",
    )
    assert (s.state_dir, s.trust_domain, s.namespace) == (str(tmp_path), "corp.example", "shop")
    assert (s.telemetry, s.access_log, s.access_log_sample) == (False, True, 0.25)
    assert MeshSettings.from_env(env, service="override").service == "override"  # arguments first
    d = MeshSettings.from_env({})
    assert d.discovery == "registry://127.0.0.1:7400" and d.control_plane == "http://127.0.0.1:7400"
    assert d.tls == "off" and d.state_dir.endswith(os.path.join(".cache", "meshlib", d.service))


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("MESH_TLS", "sometimes", "MESH_TLS='sometimes': expected one of off, permissive, strict"),
        ("MESH_SERVICE", "Bad_Name", "invalid service name 'Bad_Name'"),
        ("MESH_DISCOVERY", "dns://x", "MESH_DISCOVERY='dns://x'"),
        ("MESH_CONTROL_PLANE", "cp:7400", "expected an http(s):// URL"),
        ("MESH_TELEMETRY", "maybe", "MESH_TELEMETRY='maybe': expected on or off"),
        ("MESH_ACCESS_LOG_SAMPLE", "2", "must be from 0 to 1"),
        ("MESH_ACCESS_LOG_SAMPLE", "lots", "expected a number from 0 to 1"),
    ],
)
def test_bad_settings_name_the_variable(var, value, message):
    with pytest.raises(meshlib.ConfigurationError) as info:
        MeshSettings.from_env({var: value})
    assert message in str(info.value)


def test_process_default_mesh_and_module_level_client(upstreams, monkeypatch, tmp_path):
    (up,) = upstreams(1)
    monkeypatch.setenv("MESH_SERVICE", "frontend")
    monkeypatch.setenv("MESH_DISCOVERY", f"static:payments=127.0.0.1:{up.port}")
    monkeypatch.setenv("MESH_CONTROL_PLANE", "")
    with meshlib.Client() as client:
        r = client.get("http://payments/charge")
        assert r.status_code == 200 and r.json()["headers"]["x-mesh-caller"] == "frontend"
    default = meshlib.Mesh.default()
    assert default is meshlib.Mesh.default() and default.service == "frontend"
    with meshlib.Client() as again:  # every default client shares the one Mesh (its balancer state, its watches)
        again.get("http://payments/charge")
    assert meshlib.Mesh.default() is default
    assert list(default.services) == ["payments"]  # one state (and one watch) for both clients
    default.close()


# -- static: -----------------------------------------------------------------------------------------


def test_static_spec_syntax():
    services = parse_static_spec("payments=127.0.0.1:8001, 127.0.0.1:8002; users=[::1]:80;empty=")
    assert [(e.address, e.port) for e in services["payments"]] == [("127.0.0.1", 8001), ("127.0.0.1", 8002)]
    assert [(e.address, e.port) for e in services["users"]] == [("::1", 80)]
    assert services["empty"] == []


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("payments", "'payments' is not service=host:port"),
        ("payments=127.0.0.1", "'127.0.0.1' is not host:port"),
        ("payments=127.0.0.1:http", "invalid port 'http'"),
        ("payments=127.0.0.1:0", "invalid port '0'"),
        ("payments=127.0.0.1:80;payments=127.0.0.1:81", "listed twice"),
    ],
)
def test_static_spec_errors_say_what_is_wrong(spec, message):
    with pytest.raises(meshlib.ConfigurationError, match="static discovery") as info:
        parse_static_spec(spec)
    assert message in str(info.value)


# -- meshctl -----------------------------------------------------------------------------------------


def test_meshctl_run_serves_a_wsgi_app_registered_in_the_mesh(control_plane, tmp_path):
    cp = control_plane()
    (tmp_path / "shopapp.py").write_text(
        textwrap.dedent("""
        from flask import Flask, jsonify, request

        app = Flask("shopapp")

        @app.get("/items/<int:n>")
        def item(n):
            return jsonify({"item": n, "caller": request.headers.get("x-mesh-caller")})
    """)
    )
    port = free_port()
    env = {
        "MESH_CONTROL_PLANE": cp.url,
        "MESH_DISCOVERY": f"registry://127.0.0.1:{cp.port}",
        "MESH_STATE_DIR": str(tmp_path / "state"),
        "PYTHONPATH": str(tmp_path),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshlib.cli", "run", "shop", "shopapp:app", "--port", str(port), "--tags", "v1"],
        cwd=tmp_path,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        listed = lambda: httpx.get(cp.url + "/v1/registry/services/shop").json()["instances"]  # noqa: E731
        wait_for(lambda: listed(), timeout=30, what="the WSGI app to register")
        assert [(i["port"], i["tags"], i["meta"]["mesh_tls"]) for i in listed()] == [(port, ["v1"], "off")]
        mesh = meshlib.Mesh(
            service="web",
            discovery=f"registry://127.0.0.1:{cp.port}",
            control_plane=cp.url,
            state_dir=str(tmp_path / "web"),
        )
        with mesh, mesh.client() as client:
            r = client.get("http://shop/items/7")
            assert r.status_code == 200 and r.json() == {"item": 7, "caller": "web"}
            health = client.get("http://shop/-/mesh/health").json()
            assert health == {"status": "ok", "service": "shop"}
        proc.terminate()
        assert proc.wait(20) in (0, -15)
        wait_for(lambda: listed() == [], timeout=10, what="deregistration on SIGTERM")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_meshctl_run_reports_a_bad_app_in_one_line(tmp_path):
    r = meshctl("run", "shop", "nosuchmodule:app", cwd=tmp_path)
    assert r.returncode == 1 and "cannot load nosuchmodule:app" in r.stderr and "Traceback" not in r.stderr
    r = meshctl("run", "shop", "nosuchmodule", cwd=tmp_path)
    assert r.returncode == 1 and "expected module:attribute" in r.stderr


def test_meshctl_rules_validate(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("services:\n  payments:\n    timeout: 2s\n    retries: {attempts: 2, on: [503]}\n")
    r = meshctl("rules", "validate", "-f", str(good))
    assert r.returncode == 0 and "valid (1 service(s))" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("services:\n  payments:\n    timeout: soon\n    retries: {attempts: 99}\n")
    r = meshctl("rules", "validate", "-f", str(bad))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "services.payments.timeout" in r.stderr and "services.payments.retries.attempts" in r.stderr
    r = meshctl("rules", "validate", "-f", str(tmp_path / "missing.yaml"))
    assert r.returncode == 1 and "cannot read" in r.stderr


def test_meshctl_ca_init(tmp_path):
    state = tmp_path / "cp"
    r = meshctl("ca", "init", "--state-dir", str(state), "--trust-domain", "corp.example")
    assert r.returncode == 0 and "trust domain corp.example" in r.stdout
    assert oct((state / "ca.key").stat().st_mode & 0o777) == "0o600"
    from meshlib.security.ca import CertificateAuthority

    ca = CertificateAuthority.load(state)
    assert ca.trust_domain == "corp.example"
    assert ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    again = meshctl("ca", "init", "--state-dir", str(state))
    assert again.returncode == 1 and "Traceback" not in again.stderr  # never overwrites a CA
