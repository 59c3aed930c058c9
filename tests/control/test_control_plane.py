"""The control plane against a real ``meshctl serve`` subprocess, and clients following it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import httpx
import pytest

import meshlib
from harness import Upstream, wait_for

pytestmark = pytest.mark.e2e  # its tests start processes (servers, a control plane, meshctl)

GOOD = {"services": {"payments": {"timeout": "2s", "retries": {"attempts": 2}}}}


def test_admin_writes_need_the_token(control_plane):
    cp = control_plane()
    assert httpx.put(cp.url + "/v1/rules", content="{}").status_code == 401
    wrong = httpx.put(cp.url + "/v1/rules", content="{}", headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert httpx.post(cp.url + "/v1/rules/rollback", params={"to": 0}).status_code == 401
    assert httpx.get(cp.url + "/v1/rules").json()["version"] == 0


def test_no_admin_token_configured_means_no_admin_writes(control_plane, tmp_path):
    cp = control_plane(tmp_path / "other", admin_token=None)
    r = httpx.put(cp.url + "/v1/rules", content="{}", headers={"authorization": "Bearer anything"})
    assert r.status_code == 403 and "MESH_ADMIN_TOKEN" in r.json()["error"]


def test_invalid_rules_list_every_problem_and_store_nothing(control_plane):
    cp = control_plane()
    version = cp.apply(GOOD)
    bad = {
        "services": {
            "payments": {
                "timeout": "fast",
                "colour": "blue",
                "subsets": {"v1": {"tags": ["v1"]}, "v3": {"tags": ["v3"]}},
                "routes": [{"to": [{"subset": "v1", "weight": -5}, {"subset": "v2", "weight": 50}]}],
                "load_balancer": "random",
            }
        }
    }
    r = cp.put_rules(bad)
    assert r.status_code == 400
    paths = {e["path"] for e in r.json()["errors"]}
    assert paths == {
        "services.payments.timeout",
        "services.payments.colour",
        "services.payments.routes[0].to[0].weight",
        "services.payments.routes[0].to[1].subset",
        "services.payments.routes[0].to",
        "services.payments.load_balancer",
    }  # (the unused subset v3 is a warning, not an error: test_an_unused_subset_is_a_warning_not_an_error)
    assert cp.put_rules("not: [valid").status_code == 400
    current = httpx.get(cp.url + "/v1/rules").json()
    assert current["version"] == version and current["rules"] == GOOD


def test_long_poll_wakes_on_change_and_times_out_with_same_version(control_plane):
    cp = control_plane()
    v1 = cp.apply(GOOD)
    started = time.monotonic()
    r = httpx.get(cp.url + "/v1/rules", params={"index": v1, "wait": "300ms"})
    elapsed = time.monotonic() - started
    assert r.json()["version"] == v1 and r.headers["x-mesh-index"] == str(v1)
    assert 0.3 <= elapsed < 5.0  # held for the wait, then answered with the same version
    assert httpx.get(cp.url + "/v1/rules", params={"index": v1 - 1, "wait": "30s"}).json()["version"] == v1

    answered: dict[str, float] = {}

    def watch() -> None:
        r = httpx.get(cp.url + "/v1/rules", params={"index": v1, "wait": "20s"}, timeout=30)
        answered["at"] = time.monotonic()
        answered["version"] = r.json()["version"]

    watcher = threading.Thread(target=watch)
    watcher.start()
    wait_for(lambda: "meshcp_rules_watchers 1" in httpx.get(cp.url + "/metrics").text, what="the watcher to wait")
    changed_at = time.monotonic()
    v2 = cp.apply({"services": {"payments": {"timeout": "3s"}}})
    watcher.join(10)
    assert answered["version"] == v2
    assert answered["at"] - changed_at < 10  # woken by the change, long before its 20 s wait


def test_stale_cas_conflicts_history_and_rollback(control_plane):
    cp = control_plane()
    v1 = cp.apply(GOOD)
    assert cp.put_rules({"services": {}}, cas=v1).status_code == 200
    conflict = cp.put_rules(GOOD, cas=v1)
    assert conflict.status_code == 409 and conflict.json()["version"] == v1 + 1
    history = httpx.get(cp.url + "/v1/rules/history").json()
    assert [v["version"] for v in history["versions"]] == [v1 + 1, v1]
    r = httpx.post(cp.url + "/v1/rules/rollback", params={"to": v1}, headers=cp.admin())
    assert r.status_code == 200 and r.json()["version"] == v1 + 2
    assert httpx.get(cp.url + "/v1/rules").json()["rules"] == GOOD
    assert httpx.post(cp.url + "/v1/rules/rollback", params={"to": 99}, headers=cp.admin()).status_code == 404


def test_rules_survive_a_restart(control_plane, tmp_path):
    state = tmp_path / "durable"
    cp = control_plane(state)
    version = cp.apply(GOOD)
    cp.stop()
    assert (state / "rules.db").exists()
    again = control_plane(state)
    body = httpx.get(again.url + "/v1/rules").json()
    assert body == {"version": version, "rules": GOOD}


def test_registry_ttl_expiry_wakes_the_watch(control_plane):
    cp = control_plane()
    r = httpx.put(
        cp.url + "/v1/registry/register",
        json={"service": "users", "address": "127.0.0.1", "port": 9999, "tags": ["v1"], "ttl": "1s"},
    )
    assert r.status_code == 200
    first = httpx.get(cp.url + "/v1/registry/services/users").json()
    assert [i["port"] for i in first["instances"]] == [9999] and first["instances"][0]["tags"] == ["v1"]
    owner = {"x-mesh-instance-secret": r.json()["secret"]}
    assert httpx.put(cp.url + f"/v1/registry/heartbeat/{r.json()['id']}", headers=owner).status_code == 200
    started = time.monotonic()
    after = httpx.get(cp.url + "/v1/registry/services/users", params={"index": first["index"], "wait": "10s"})
    assert after.json()["instances"] == []
    assert time.monotonic() - started < 2.0  # TTL 1 s after the heartbeat, noticed within the expiry tick
    assert httpx.put(cp.url + f"/v1/registry/heartbeat/{r.json()['id']}", headers=owner).status_code == 404
    bad = httpx.put(cp.url + "/v1/registry/register", json={"service": "Bad Name", "address": "x", "port": 0})
    assert bad.status_code == 400 and "service" in bad.json()["error"]


# -- clients following the control plane ----------------------------------------------------------


@pytest.fixture
def mesh_env(control_plane, tmp_path):
    """A control plane, plus the environment a meshed process needs to use it."""
    cp = control_plane()
    env = {
        "MESH_DISCOVERY": f"registry://127.0.0.1:{cp.port}",
        "MESH_CONTROL_PLANE": cp.url,
        "MESH_STATE_DIR": str(tmp_path / "instances"),
    }
    return cp, env


def start_instances(env: dict[str, str], spec: list[tuple[str, str]], started: list[Upstream]) -> list[Upstream]:
    batch = [Upstream(name, mesh_service="payments", tags=tags, env=env) for name, tags in spec]
    started.extend(batch)
    return [u.wait_listening() for u in batch]


@pytest.fixture
def instances():
    started: list[Upstream] = []
    yield started
    for u in started:
        u.stop()


def client_mesh(cp, tmp_path, name: str = "frontend") -> meshlib.Mesh:
    return meshlib.Mesh(
        service=name,
        discovery=f"registry://127.0.0.1:{cp.port}",
        control_plane=cp.url,
        state_dir=str(tmp_path / name),
    )


ROUTED = {
    "services": {
        "payments": {
            "subsets": {"v1": {"tags": ["v1"]}, "v2": {"tags": ["v2"]}},
            "routes": [
                {"match": {"headers": {"x-user-group": "beta"}}, "to": [{"subset": "v2"}]},
                {
                    "to": [{"subset": "v1", "weight": 80}, {"subset": "v2", "weight": 20}],
                    "sticky": {"header": "x-user-id"},
                },
            ],
        }
    }
}


def version_of(client: meshlib.Client, **headers: str) -> str:
    return str(client.get("http://payments/x", headers=headers).json()["instance"])[:2]


def test_routes_splits_headers_and_live_changes(mesh_env, instances, tmp_path):
    cp, env = mesh_env
    start_instances(env, [("v1a", "v1"), ("v1b", "v1"), ("v2a", "v2")], instances)
    v = cp.apply(ROUTED)
    mesh = client_mesh(cp, tmp_path)
    assert mesh.rules_watcher is not None and mesh.rules_watcher.wait_for_version(v, 5)
    with mesh, mesh.client() as client:
        wait_for(lambda: len(mesh.service_state("payments").handles) == 3, what="three instances discovered")
        # Header routing.
        assert {version_of(client, **{"x-user-group": "beta"}) for _ in range(30)} == {"v2"}
        # Weighted split: 80/20 within a few percent over 2,000 requests.
        seen = Counter(version_of(client) for _ in range(2000))
        assert abs(seen["v2"] / 2000 - 0.20) < 0.03, seen
        # Sticky: one user keeps one version.
        for user in ("alice", "bob", "carol", "dave"):
            assert len({version_of(client, **{"x-user-id": user}) for _ in range(10)}) == 1
        # A pushed 100% route to v2 is followed within a second.
        canary = json.loads(json.dumps(ROUTED))
        canary["services"]["payments"]["routes"][1] = {"to": [{"subset": "v2"}]}
        canary["services"]["payments"]["routes"].append(
            {"match": {"headers": {"x-pin": "v1"}}, "to": [{"subset": "v1"}]}
        )
        # (timed from the control plane holding it to the client applying it: the push alone, not the requests
        # after it, which a loaded machine slows)
        version = cp.apply(canary)
        stored = time.monotonic()
        assert mesh.rules_watcher.wait_for_version(version, 10)
        followed = time.monotonic() - stored
        assert all(version_of(client) == "v2" for _ in range(20))
        assert followed < 1.0, f"the push took {followed:.2f} s"


def test_fault_injection(mesh_env, instances, tmp_path):
    cp, env = mesh_env
    (inst,) = start_instances(env, [("v1a", "v1")], instances)
    v = cp.apply({"services": {"payments": {"faults": {"abort": {"percent": 100, "status": 418}}}}})
    mesh = client_mesh(cp, tmp_path)
    assert mesh.rules_watcher is not None and mesh.rules_watcher.wait_for_version(v, 5)
    with mesh, mesh.client() as client:
        r = client.get("http://payments/x")
        assert r.status_code == 418 and r.headers["x-mesh-fault"] == "abort"
        assert inst.hits() == 0  # aborted before any call
        v = cp.apply({"services": {"payments": {"faults": {"delay": {"percent": 100, "duration": "300ms"}}}}})
        assert mesh.rules_watcher.wait_for_version(v, 5)
        started = time.monotonic()
        assert client.get("http://payments/x").status_code == 200
        assert time.monotonic() - started >= 0.3
        v = cp.apply({"services": {"payments": {"faults": {"abort": {"percent": 50, "status": 503}}}}})
        assert mesh.rules_watcher.wait_for_version(v, 5)
        codes = Counter(client.get("http://payments/x").status_code for _ in range(400))
        assert abs(codes[503] / 400 - 0.5) < 0.1, codes


def test_control_plane_down_clients_keep_last_rules_and_endpoints(mesh_env, instances, tmp_path):
    cp, env = mesh_env
    start_instances(env, [("v1a", "v1"), ("v2a", "v2")], instances)
    rules = json.loads(json.dumps(ROUTED))
    rules["services"]["payments"]["routes"][1] = {"to": [{"subset": "v2"}]}
    rules["services"]["payments"]["routes"].insert(0, {"match": {"headers": {"x-pin": "v1"}}, "to": [{"subset": "v1"}]})
    v = cp.apply(rules)
    mesh = client_mesh(cp, tmp_path)
    assert mesh.rules_watcher is not None and mesh.rules_watcher.wait_for_version(v, 5)
    with mesh.client() as client:
        wait_for(lambda: len(mesh.service_state("payments").handles) == 2, what="both instances")
        assert {version_of(client) for _ in range(20)} == {"v2"}
        cp.kill()
        assert {version_of(client) for _ in range(50)} == {"v2"}  # still routed, still served
    mesh.close()
    # A client restarted while the control plane is down starts from what it saved.
    restarted = client_mesh(cp, tmp_path)
    with restarted, restarted.client() as client:
        assert restarted.rules.version == v
        assert {version_of(client) for _ in range(20)} == {"v2"}
        assert version_of(client, **{"x-user-group": "beta"}) == "v2"


def test_sigterm_deregisters_first_then_drains(mesh_env, instances, tmp_path):
    """POSTs are not retried once sent, so a crash or a connection closed under a request would show as a failure:
    zero failures means in-flight requests finished and new ones went elsewhere. And the order is checked: the
    instance is out of the registry while it still answers (draining), before it stops accepting."""
    cp, env = mesh_env
    a = Upstream("v1a", mesh_service="payments", tags="v1", env=env, extra_args=("--drain-delay", "2"))
    b = Upstream("v1b", mesh_service="payments", tags="v1", env=env)
    instances.extend([a, b])
    a.wait_listening()
    b.wait_listening()
    listed = lambda: {i["port"] for i in httpx.get(cp.url + "/v1/registry/services/payments").json()["instances"]}  # noqa: E731
    wait_for(lambda: listed() == {a.port, b.port}, what="both registered")
    mesh = client_mesh(cp, tmp_path)
    with mesh, mesh.client() as client:
        wait_for(lambda: len(mesh.service_state("payments").handles) == 2, what="both instances")
        stop = threading.Event()
        results: list[object] = []

        def load() -> None:
            while not stop.is_set():
                try:
                    results.append(client.post("http://payments/x", json={"n": len(results)}).status_code)
                except Exception as exc:
                    results.append(exc)

        worker = threading.Thread(target=load)
        worker.start()
        wait_for(lambda: len(results) > 50, what="load")
        a.proc.terminate()
        wait_for(lambda: listed() == {b.port}, timeout=5, what="deregistration")
        draining = httpx.get(a.url + "/-/mesh/health", timeout=5)  # deregistered, and still serving
        assert draining.status_code == 503 and draining.json()["status"] == "draining"
        assert a.proc.wait(15) in (0, -signal.SIGTERM)  # then a clean exit
        wait_for(lambda: len(mesh.service_state("payments").handles) == 1, what="the client to drop the instance")
        count = len(results)
        wait_for(lambda: len(results) > count + 50, what="load after the shutdown")
        stop.set()
        worker.join(10)
    assert [r for r in results if r != 200] == []
    assert b.hits("POST") > 50


def test_meshctl_cli(control_plane, tmp_path):
    cp = control_plane()
    env = {"MESH_CONTROL_PLANE": cp.url, "MESH_ADMIN_TOKEN": cp.admin_token, "PATH": "/usr/bin:/bin"}

    def meshctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "meshlib.cli", *args], capture_output=True, text=True, env=env, timeout=60
        )

    bad = tmp_path / "bad.yaml"
    bad.write_text("services:\n  payments:\n    timeout: soon\n    retries: {attempts: 0}\n")
    r = meshctl("rules", "apply", "-f", str(bad))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "services.payments.timeout" in r.stderr and "services.payments.retries.attempts" in r.stderr
    good = tmp_path / "good.yaml"
    good.write_text("services:\n  payments:\n    retries: {attempts: 2, on: [connect-failure, 503]}\n")
    r = meshctl("rules", "apply", "-f", str(good), "--comment", "first")
    assert r.returncode == 0 and "version 1" in r.stdout
    r = meshctl("rules", "get")
    assert "attempts: 2" in r.stdout and "connect-failure" in r.stdout
    r = meshctl("rules", "apply", "-f", str(good))
    assert r.returncode == 0 and "no change" in r.stdout  # the same rules again make no new version
    good.write_text("services:\n  payments:\n    retries: {attempts: 3, on: [connect-failure, 503]}\n")
    meshctl("rules", "apply", "-f", str(good))
    r = meshctl("rules", "history")
    assert r.returncode == 0 and "first" in r.stdout
    r = meshctl("rules", "rollback", "1")
    assert r.returncode == 0 and "now version 3" in r.stdout
    r = meshctl("status")
    assert r.returncode == 0 and "rules version 3" in r.stdout
    r = meshctl("rules", "apply", "-f", str(tmp_path / "missing.yaml"))
    assert r.returncode == 1 and "cannot read" in r.stderr
    env["MESH_ADMIN_TOKEN"] = "wrong"
    r = meshctl("rules", "apply", "-f", str(good))
    assert r.returncode == 1 and "401" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "meshlib.cli", "--control-plane", "http://127.0.0.1:1", "status"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "cannot reach the control plane" in r.stderr


def test_meshctl_status_shows_golden_signals(mesh_env, instances, tmp_path):
    cp, env = mesh_env
    start_instances(env, [("v1a", "v1"), ("v1b", "v1")], instances)
    mesh = client_mesh(cp, tmp_path)
    stop = threading.Event()
    with mesh, mesh.client() as client:
        wait_for(lambda: len(mesh.service_state("payments").handles) == 2, what="both instances")

        def load() -> None:
            while not stop.is_set():
                client.get("http://payments/x")

        worker = threading.Thread(target=load)
        worker.start()
        try:
            r = subprocess.run(
                [sys.executable, "-m", "meshlib.cli", "--control-plane", cp.url, "status", "--interval", "1", "-v"],
                capture_output=True,
                text=True,
                timeout=60,
            )
        finally:
            stop.set()
            worker.join(10)
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("payments"))
    _name, count, rate, success, p50, p99 = row.split()
    assert count == "2" and float(rate) > 5 and success == "100.0%" and 0 < float(p50) <= float(p99)


def test_an_unused_subset_is_a_warning_not_an_error(control_plane, tmp_path):
    """After a finished canary: v2 takes everything, v1 is kept for a rollback."""
    import os

    cp = control_plane()
    finished = {
        "services": {
            "payments": {
                "subsets": {"v1": {"tags": ["v1"]}, "v2": {"tags": ["v2"]}},
                "routes": [{"to": [{"subset": "v2"}]}],
            }
        }
    }
    r = cp.put_rules(finished)
    assert r.status_code == 200, r.text
    assert r.json()["warnings"] == [
        {
            "path": "services.payments.subsets.v1",
            "error": "no route sends traffic to this subset (kept, e.g. for a rollback)",
        }
    ]
    path = tmp_path / "finished.json"
    path.write_text(json.dumps(finished))
    env = {**os.environ, "MESH_ADMIN_TOKEN": cp.admin_token or "", "MESH_CONTROL_PLANE": cp.url}
    applied = subprocess.run(
        [sys.executable, "-m", "meshlib.cli", "rules", "apply", "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert applied.returncode == 0, applied.stderr
    assert "warning: services.payments.subsets.v1: no route sends traffic to this subset" in applied.stdout
