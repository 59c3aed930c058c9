"""Per-service rules through a real ``meshctl serve`` and real ``meshctl`` processes (issue 31): a team changes its
service's rules (and only those) with an admin token scoped to it; ``rules apply`` changes what the file names,
shows the diff, refuses a version it did not see; history, diff, rollback and delete per service."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_meshctl_operator import _env, meshctl

pytestmark = pytest.mark.e2e  # its tests start processes (a control plane, meshctl)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def token(cp: Any, services: list[str], role: str) -> str:
    r = httpx.post(cp.url + "/v1/tokens", json={"services": services, "role": role}, headers=cp.admin())
    assert r.status_code == 201, r.text
    assert r.json()["role"] == role
    return str(r.json()["token"])


def test_an_admin_token_scoped_to_payments_changes_payments_and_nothing_else(control_plane: Any) -> None:
    cp = control_plane()
    cp.apply({"services": {"ledger": {"authorization": {"mode": "strict", "allow": ["billing"]}}}})
    team = token(cp, ["payments"], "admin")
    join = token(cp, ["payments"], "join")
    url = cp.url + "/v1/rules/services/"

    r = httpx.put(url + "payments", params={"cas": 0}, json={"timeout": "2s"}, headers=bearer(team))
    assert r.status_code == 200, r.text
    assert r.json()["changed"] == ["services/payments"] and r.json()["resources"] == {"services/payments": 2}
    whole = httpx.get(cp.url + "/v1/rules").json()
    assert whole["version"] == 2, "instances long-poll the merged document"
    assert whole["rules"]["services"]["ledger"]["authorization"]["allow"] == ["billing"], "ledger untouched"
    history = httpx.get(url + "payments/history").json()
    assert history["versions"][0]["action"] == "created" and "(token " in history["versions"][0]["author"]

    # everything else is refused, and says what the token may do
    ledger = httpx.put(url + "ledger", json={"timeout": "1s"}, headers=bearer(team))
    assert ledger.status_code == 403 and "not ledger" in ledger.json()["error"]
    assert "admin token" in ledger.json()["error"] and "payments" in ledger.json()["error"]
    both = httpx.patch(
        cp.url + "/v1/rules",
        json={"resources": {"services/payments": {"timeout": "3s"}, "services/ledger": None}},
        headers=bearer(team),
    )
    assert both.status_code == 403 and "ledger" in both.json()["error"]
    assert httpx.put(cp.url + "/v1/rules", json={}, headers=bearer(team)).status_code == 403
    assert httpx.put(cp.url + "/v1/rules/defaults", json={"timeout": "1s"}, headers=bearer(team)).status_code == 403
    assert httpx.delete(url + "ledger", headers=bearer(team)).status_code == 403
    assert httpx.post(cp.url + "/v1/rules/rollback", params={"to": 1}, headers=bearer(team)).status_code == 403
    minted = httpx.post(cp.url + "/v1/tokens", json={"services": ["ledger"]}, headers=bearer(team))
    assert minted.status_code == 403, "a team's token makes no tokens"
    # the two roles never stand in for each other
    joined = httpx.put(url + "payments", json={"timeout": "9s"}, headers=bearer(join))
    assert joined.status_code == 403 and "join token" in joined.json()["error"]
    registered = httpx.put(
        cp.url + "/v1/registry/register",
        json={"service": "payments", "address": "127.0.0.1", "port": 9, "ttl": "60s"},
        headers=bearer(team),
    )
    assert registered.status_code == 403 and "join token" in registered.json()["error"]
    assert httpx.get(cp.url + "/v1/rules").json()["version"] == 2, "nothing refused was stored"


def test_each_service_has_its_own_version_history_diff_and_rollback(control_plane: Any) -> None:
    cp = control_plane()
    url = cp.url + "/v1/rules/services/"
    h = cp.admin()
    assert httpx.put(url + "payments", json={"timeout": "2s"}, headers=h).json()["resources"] == {
        "services/payments": 1
    }
    httpx.put(url + "ledger", json={"timeout": "1s"}, headers=h)
    changed = httpx.put(url + "payments", params={"cas": 1}, json={"timeout": "3s"}, headers=h)
    assert changed.status_code == 200 and changed.json()["version"] == 3, "ledger's change is no conflict"
    stale = httpx.put(url + "payments", params={"cas": 1}, json={"timeout": "4s"}, headers=h)
    assert stale.status_code == 409 and stale.json()["version"] == 3 and "payments" in stale.json()["error"]
    shown = httpx.get(url + "payments").json()
    assert shown == {"resource": "services/payments", "version": 3, "rules": {"timeout": "3s"}, "rules_version": 3}
    diff = httpx.get(url + "payments/diff").json()
    assert diff["from"] == 2 and diff["to"] == 3
    assert "-    timeout: 2s" in diff["diff"] and "+    timeout: 3s" in diff["diff"] and "ledger" not in diff["diff"]
    back = httpx.post(url + "payments/rollback", params={"to": 1}, headers=h)
    assert back.status_code == 200 and back.json()["version"] == 4
    rules = httpx.get(cp.url + "/v1/rules").json()["rules"]["services"]
    assert rules == {"payments": {"timeout": "2s"}, "ledger": {"timeout": "1s"}}
    versions = [(v["version"], v["action"]) for v in httpx.get(url + "payments/history").json()["versions"]]
    assert versions == [(4, "changed"), (3, "changed"), (1, "created")]
    assert httpx.get(url + "NOT_A_NAME").status_code == 404
    assert httpx.put(url + "payments", content=b"[1, 2]", headers=h).status_code == 400
    bad = httpx.put(url + "payments", json={"timeout": "soon"}, headers=h)
    assert bad.status_code == 400 and bad.json()["errors"][0]["path"] == "services.payments.timeout"


def test_a_per_service_write_wakes_the_instances_long_poll(control_plane: Any) -> None:
    cp = control_plane()
    started = time.monotonic()
    with httpx.Client(timeout=30) as client:
        answers: list[dict[str, Any]] = []
        waiter = threading.Thread(
            target=lambda: answers.append(client.get(cp.url + "/v1/rules", params={"index": 0, "wait": "20s"}).json())
        )
        waiter.start()
        time.sleep(0.3)  # the long-poll is held (answering at once would also pass, so this is no luck)
        httpx.put(cp.url + "/v1/rules/services/payments", json={"timeout": "2s"}, headers=cp.admin())
        waiter.join(20)
    assert answers and answers[0]["version"] == 1 and time.monotonic() - started < 15


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_rules_apply_changes_only_the_services_the_file_names(control_plane: Any, tmp_path: Path) -> None:
    """The trap a new user met: a canary file for payments replaced the whole document, and stock's
    authorization block was gone. Now each team's file changes its own service."""
    cp = control_plane()
    for service in ("orders", "stock", "payments"):
        r = httpx.put(
            cp.url + "/v1/registry/register",
            json={"service": service, "address": "127.0.0.1", "port": 9, "ttl": "60s", "tags": ["v1", "v2"]},
        )
        assert r.status_code == 200, r.text
    stock = _write(tmp_path / "stock.yaml", "services:\n  stock:\n    authorization: {mode: strict, allow: [orders]}\n")
    r = meshctl("rules", "apply", "-f", stock, env=_env(cp))
    assert r.returncode == 0 and "rules version 1 applied" in r.stdout, r.stdout + r.stderr
    canary = _write(
        tmp_path / "payments.yaml",
        "services:\n  payments:\n    subsets: {v1: {tags: [v1]}, v2: {tags: [v2]}}\n"
        "    routes:\n      - to: [{subset: v1, weight: 90}, {subset: v2, weight: 10}]\n",
    )
    r = meshctl("rules", "apply", "-f", canary, env=_env(cp))
    assert r.returncode == 0 and "rules version 2 applied" in r.stdout, r.stdout + r.stderr
    assert "+  payments:" in r.stdout and "stock" not in r.stdout, "the diff shows the file's services only"
    services = httpx.get(cp.url + "/v1/rules").json()["rules"]["services"]
    assert services["stock"]["authorization"] == {"mode": "strict", "allow": ["orders"]}

    # payments' team, with a token scoped to payments, over the version it saw
    team = token(cp, ["payments"], "admin")
    heavier = _write(
        tmp_path / "payments2.yaml",
        "services:\n  payments:\n    subsets: {v1: {tags: [v1]}, v2: {tags: [v2]}}\n"
        "    routes:\n      - to: [{subset: v1, weight: 50}, {subset: v2, weight: 50}]\n",
    )
    as_team = {"MESH_CONTROL_PLANE": cp.url, "MESH_ADMIN_TOKEN": team}
    r = meshctl("rules", "apply", "-f", heavier, "--expect-version", "1", env=as_team)
    assert r.returncode == 1 and "at version 2, not 1" in r.stderr and "Traceback" not in r.stderr
    r = meshctl("rules", "apply", "-f", heavier, "--expect-version", "2", env=as_team)
    assert r.returncode == 0 and "rules version 3 applied" in r.stdout, r.stderr
    r = meshctl("rules", "apply", "-f", stock, "--force", env=as_team)
    assert r.returncode == 0 and "no change" in r.stdout, "the same rules: nothing to send"
    other = _write(tmp_path / "stock2.yaml", "services:\n  stock:\n    timeout: 2s\n")
    r = meshctl("rules", "apply", "-f", other, "--force", env=as_team)
    assert r.returncode == 1 and "403" in r.stderr and "not stock" in r.stderr and "Traceback" not in r.stderr

    # a stock file without its authorization block: refused with the diff, unless --force
    r = meshctl("rules", "apply", "-f", other, env=_env(cp))
    assert r.returncode == 1 and "services.stock.authorization disappears" in r.stdout
    assert "-    authorization:" in r.stdout and "+    timeout: 2s" in r.stdout

    history = meshctl("rules", "history", "--service", "payments", env=_env(cp))
    assert history.returncode == 0 and [line.split()[0] for line in history.stdout.splitlines()[1:]] == ["3*", "2"]
    delete = meshctl("rules", "delete", "stock", env=_env(cp))
    assert delete.returncode == 1 and "authorization block" in delete.stderr
    assert meshctl("rules", "delete", "stock", "--force", env=_env(cp)).returncode == 0
    assert "stock" not in httpx.get(cp.url + "/v1/rules").json()["rules"]["services"]
    shown = meshctl("rules", "get", "--service", "payments", env=_env(cp))
    assert "weight: 50" in shown.stdout and shown.stdout.startswith("# payments, as of rules version 4")

    # --replace-all: the whole document is the file (what apply did before)
    r = meshctl("rules", "apply", "-f", other, "--replace-all", "--force", env=_env(cp))
    assert r.returncode == 0, r.stderr
    assert httpx.get(cp.url + "/v1/rules").json()["rules"] == json.loads('{"services": {"stock": {"timeout": "2s"}}}')
