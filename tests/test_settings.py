"""Every environment variable the data plane reads goes through MeshSettings: one place that says what is read,
and explicit settings that the environment cannot override behind the caller's back."""

from __future__ import annotations

import ast
from pathlib import Path

import meshlib
from meshlib.settings import MeshSettings


def test_identity_bootstrap_and_consul_variables_are_settings():
    env = {
        "MESH_BOOTSTRAP_TOKEN": "t0ken",
        "MESH_TLS_CERT": "/c.pem",
        "MESH_TLS_KEY": "/k.pem",
        "MESH_TLS_CA": "/ca.pem",
        "MESH_TLS_CERT_LIFETIME": "2h",
        "CONSUL_HTTP_ADDR": "10.0.0.9:8500",
        "CONSUL_HTTP_TOKEN": "acl-secret",
        "MESH_SERVICE": "svc",
    }
    settings = MeshSettings.from_env(env)
    assert (settings.bootstrap_token, settings.tls_cert, settings.tls_key, settings.tls_ca) == (
        "t0ken", "/c.pem", "/k.pem", "/ca.pem")
    assert settings.tls_cert_lifetime == "2h"
    assert (settings.consul_http_addr, settings.consul_http_token) == ("10.0.0.9:8500", "acl-secret")
    assert "t0ken" not in repr(settings) and "acl-secret" not in repr(settings), "secrets stay out of logs"


def test_the_mesh_module_reads_no_environment_variable_itself():
    """mesh.py reads os.environ only to tell whether MESH_SERVICE was set (for a warning); everything else comes
    from MeshSettings, so Mesh(settings=...) means exactly those settings."""
    source = Path(meshlib.mesh.__file__).read_text()
    reads = [
        node for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Attribute) and node.attr == "environ"
    ]
    assert len(reads) == 1
