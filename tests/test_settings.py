"""Every environment variable the data plane reads goes through MeshSettings: one place that says what is read,
and explicit settings that the environment cannot override behind the caller's back."""

from __future__ import annotations

import ast
from pathlib import Path

import meshlib
from meshlib.settings import MeshSettings, env_value


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
        "t0ken",
        "/c.pem",
        "/k.pem",
        "/ca.pem",
    )
    assert settings.tls_cert_lifetime == "2h"
    assert (settings.consul_http_addr, settings.consul_http_token) == ("10.0.0.9:8500", "acl-secret")
    assert "t0ken" not in repr(settings) and "acl-secret" not in repr(settings), "secrets stay out of logs"


def _environ_reads(source: str) -> list[str]:
    """Names of variables a module reads from ``os.environ`` (gets, loads and ``in`` tests; not writes)."""

    def is_environ(node: ast.AST) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "environ"

    names = []
    for node in ast.walk(ast.parse(source)):
        key: ast.AST | None = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and is_environ(node.func.value):
            key = node.args[0] if node.args else None
        elif isinstance(node, ast.Subscript) and is_environ(node.value) and isinstance(node.ctx, ast.Load):
            key = node.slice
        elif isinstance(node, ast.Compare) and any(is_environ(c) for c in node.comparators):
            key = node.left
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            names.append(key.value)
    return names


def test_only_settings_reads_mesh_variables():
    """Every MESH_*/CONSUL_* variable is read in settings.py (MeshSettings, or env_value for the tools), so the
    names and their meaning live in one place. OpenTelemetry's own OTEL_* variables are read where OTel is set up."""
    root = Path(meshlib.__file__).parent
    readers = {
        str(path.relative_to(root)): names
        for path in root.rglob("*.py")
        if path.name != "settings.py"
        and (names := [n for n in _environ_reads(path.read_text()) if n.startswith(("MESH", "CONSUL_"))])
    }
    assert readers == {}


def test_env_value_reads_a_variable_by_its_setting_name():
    environ = {"MESH_BOOTSTRAP_TOKEN": "t", "MESH_ADMIN_TOKEN": "a", "CONSUL_HTTP_ADDR": "c:1"}
    assert env_value("bootstrap_token", environ=environ) == "t"
    assert env_value("admin_token", environ=environ) == "a"
    assert env_value("consul_http_addr", environ=environ) == "c:1"
    assert env_value("namespace", "default", environ=environ) == "default"
    sample = "\n".join(
        [
            "import os",
            'os.environ.get("MESH_X")',
            'os.environ["MESH_Y"]',
            '"MESH_Z" in os.environ',
            'os.environ["MESH_W"] = "1"',
        ]
    )
    assert sorted(_environ_reads(sample)) == ["MESH_X", "MESH_Y", "MESH_Z"], "reads, not writes"
