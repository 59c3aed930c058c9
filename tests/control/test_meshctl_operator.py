"""The operator's path through meshctl (issue 31): an https control plane verified with the mesh CA, one line
instead of a traceback (a busy port, a reader that leaves early), and ``rules apply`` that shows what it changes
and refuses the easy mistakes. Real ``meshctl serve`` and ``meshctl`` subprocesses."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from meshlib.security.ca import CertificateAuthority

pytestmark = pytest.mark.e2e  # its tests start processes (a control plane, meshctl)


def meshctl(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    return subprocess.run(
        [sys.executable, "-m", "meshlib.cli", *args],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        timeout=60,
        input=stdin,
    )


def _env(cp: Any, **extra: str) -> dict[str, str]:
    return {"MESH_CONTROL_PLANE": cp.url, "MESH_ADMIN_TOKEN": cp.admin_token, **extra}


def test_meshctl_verifies_an_https_control_plane_with_the_mesh_ca(control_plane: Any, tmp_path: Path) -> None:
    cp = control_plane(extra_args=("--tls",))
    roots = str(cp.state_dir / "ca-roots.pem")
    untrusted = meshctl("status", env=_env(cp))
    assert untrusted.returncode == 1 and "Traceback" not in untrusted.stderr
    assert "set MESH_CONTROL_PLANE_CA" in untrusted.stderr and "ca-roots.pem" in untrusted.stderr
    trusted = meshctl("status", env=_env(cp, MESH_CONTROL_PLANE_CA=roots))
    assert trusted.returncode == 0, trusted.stderr
    assert "rules version 0" in trusted.stdout
    assert meshctl("--ca", roots, "rules", "history", env=_env(cp)).returncode == 0
    other = CertificateAuthority.init(tmp_path / "another-mesh")
    (tmp_path / "other.pem").write_bytes(other.roots_pem())
    wrong = meshctl("status", env=_env(cp, MESH_CONTROL_PLANE_CA=str(tmp_path / "other.pem")))
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    assert "not signed by the CA in" in wrong.stderr and "check MESH_CONTROL_PLANE_CA" in wrong.stderr
    (tmp_path / "garbage.pem").write_text("not a certificate")
    garbage = meshctl("--ca", str(tmp_path / "garbage.pem"), "status", env=_env(cp))
    assert garbage.returncode == 1 and "--ca=" in garbage.stderr and "not a usable CA file" in garbage.stderr


def test_strict_instances_that_cannot_get_a_certificate_say_so_in_one_line(control_plane: Any, tmp_path: Path) -> None:
    """meshctl run in strict mode: no token, a wrong token, the wrong CA file, no control plane. Each is one line
    that says what to do, and the refusals are said at once, not after half a minute of retries."""
    cp = control_plane(extra_args=("--tls",))
    roots = str(cp.state_dir / "ca-roots.pem")
    app = tmp_path / "app.py"
    app.write_text("async def app(scope, receive, send):\n    pass\n")
    other = CertificateAuthority.init(tmp_path / "another-mesh")
    (tmp_path / "other.pem").write_bytes(other.roots_pem())

    def run(**env: str) -> subprocess.CompletedProcess[str]:
        base = {
            "MESH_TLS": "strict",
            "MESH_CONTROL_PLANE": cp.url,
            "MESH_CONTROL_PLANE_CA": roots,
            "MESH_STATE_DIR": str(tmp_path / "state"),
            "PYTHONPATH": str(tmp_path),
            **env,
        }
        return subprocess.run(
            [sys.executable, "-m", "meshlib.cli", "run", "payments", "app:app", "--port", "0"],
            capture_output=True,
            text=True,
            env={**{k: v for k, v in os.environ.items() if not k.startswith("MESH_")}, **base},
            timeout=60,
        )

    cases = {
        "no token": (run(), "needs a join token"),
        "a wrong token": (run(MESH_BOOTSTRAP_TOKEN="bogus"), "wrong token"),
        "another mesh's CA": (run(MESH_CONTROL_PLANE_CA=str(tmp_path / "other.pem")), "check MESH_CONTROL_PLANE_CA"),
    }
    for case, (done, said) in cases.items():
        assert done.returncode == 1, (case, done.stderr)
        assert "Traceback" not in done.stderr, (case, done.stderr)
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("meshctl: ") and said in last, (case, done.stderr)
        assert "within" not in last, (case, last)  # refused at once: not a timeout


def test_serve_on_a_busy_port_says_so_and_writes_nothing(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        state = tmp_path / "state"
        r = meshctl("serve", "--port", str(port), "--state-dir", str(state))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"127.0.0.1:{port}: the port is in use" in r.stderr and "--port" in r.stderr
    assert not state.exists(), "a CA or database was written before the port was checked"


def test_a_reader_that_leaves_early_is_not_an_error(control_plane: Any) -> None:
    """``meshctl rules history | head``: the pipe closes before meshctl writes; no BrokenPipeError."""
    cp = control_plane()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshlib.cli", "rules", "history"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**clean, **_env(cp)},
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first line is written (meshctl takes longer to start)
    err = proc.stderr.read()
    assert proc.wait(60) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_rules_apply_shows_the_diff_and_changes_nothing_on_a_dry_run(control_plane: Any, tmp_path: Path) -> None:
    cp = control_plane()
    first = tmp_path / "first.yaml"
    first.write_text("services:\n  payments:\n    timeout: 2s\n")
    r = meshctl("rules", "apply", "-f", str(first), env=_env(cp))
    assert r.returncode == 0, r.stderr
    assert "+services:" in r.stdout and "rules version 1 applied" in r.stdout
    second = tmp_path / "second.yaml"
    second.write_text("services:\n  payments:\n    timeout: 3s\n")
    r = meshctl("rules", "apply", "-f", str(second), "--dry-run", env=_env(cp))
    assert r.returncode == 0, r.stderr
    assert "-    timeout: 2s" in r.stdout and "+    timeout: 3s" in r.stdout
    assert "dry run: nothing applied (the rules stay at version 1)" in r.stdout
    assert httpx.get(cp.url + "/v1/rules").json()["version"] == 1
    history = httpx.get(cp.url + "/v1/rules/history").json()["versions"]
    assert history[0]["author"] not in ("", "admin"), "the author is who ran meshctl"


def test_rules_apply_refuses_over_a_version_it_did_not_see(control_plane: Any, tmp_path: Path) -> None:
    cp = control_plane()
    cp.apply({"services": {"payments": {"timeout": "2s"}}})
    cp.apply({"services": {"payments": {"timeout": "4s"}}})
    change = tmp_path / "change.yaml"
    change.write_text("services:\n  payments:\n    timeout: 3s\n")
    r = meshctl("rules", "apply", "-f", str(change), "--expect-version", "1", env=_env(cp))
    assert r.returncode == 1 and "at version 2, not 1" in r.stderr and "Traceback" not in r.stderr
    assert httpx.get(cp.url + "/v1/rules").json()["version"] == 2
    r = meshctl("rules", "apply", "-f", str(change), "--expect-version", "2", env=_env(cp))
    assert r.returncode == 0 and "rules version 3 applied" in r.stdout, r.stderr


def test_rules_apply_refuses_the_easy_mistakes_without_force(control_plane: Any, tmp_path: Path) -> None:
    """The traps a new user met: a canary file that silently dropped the authorization block, a typo in ``allow``
    that locked a caller out, an empty file accepted."""
    cp = control_plane()
    for service in ("orders", "stock"):
        r = httpx.put(
            cp.url + "/v1/registry/register",
            json={"service": service, "address": "127.0.0.1", "port": 9, "ttl": "60s"},
        )
        assert r.status_code == 200, r.text
    cp.apply({"services": {"stock": {"authorization": {"mode": "strict", "allow": ["orders"]}}}})
    canary = tmp_path / "canary.yaml"
    canary.write_text(
        "services:\n  stock:\n    subsets: {v1: {tags: [v1]}, v2: {tags: [v2]}}\n"
        "    routes:\n      - to: [{subset: v1, weight: 90}, {subset: v2, weight: 10}]\n"
    )
    r = meshctl("rules", "apply", "-f", str(canary), env=_env(cp))
    assert r.returncode == 1 and "services.stock.authorization disappears" in r.stdout
    assert "orders" in r.stdout and "--force" in r.stderr
    assert httpx.get(cp.url + "/v1/rules").json()["version"] == 1, "refused, yet applied"

    typo = tmp_path / "typo.yaml"
    typo.write_text("services:\n  stock:\n    authorization: {mode: strict, allow: [ordrs]}\n")
    r = meshctl("rules", "apply", "-f", str(typo), env=_env(cp))
    assert r.returncode == 1 and "no service named 'ordrs' is registered" in r.stdout
    assert "did you mean orders?" in r.stdout

    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    r = meshctl("rules", "apply", "-f", str(empty), env=_env(cp))
    assert r.returncode == 1 and "the document is empty" in r.stderr and "Traceback" not in r.stderr
    assert httpx.get(cp.url + "/v1/rules").json()["version"] == 1

    r = meshctl("rules", "apply", "-f", str(canary), "--force", env=_env(cp))
    assert r.returncode == 0 and "rules version 2 applied" in r.stdout, r.stderr
    fine = tmp_path / "fine.yaml"
    fine.write_text("services:\n  stock:\n    authorization: {mode: strict, allow: [orders]}\n")
    r = meshctl("rules", "apply", "-f", str(fine), env=_env(cp))
    assert r.returncode == 0 and "warning" not in r.stdout and "rules version 3 applied" in r.stdout, r.stdout
