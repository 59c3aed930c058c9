"""Attack: take over or pollute the embedded registry. Registrations are owned (a per-instance secret), addresses
are checked, TTLs are bounded, and without a bootstrap token only this machine may write."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import httpx
import pytest

from harness import wait_for
from meshlib.control.app import ControlPlane, build_app
from meshlib.control.registry import Registry
from meshlib.control.store import SQLiteRulesStore

TOKEN = "registry-bootstrap"


@pytest.fixture
def cp(control_plane):
    return control_plane(bootstrap_token=TOKEN)


def auth(**extra: str) -> dict[str, str]:
    return {"authorization": f"Bearer {TOKEN}", **extra}


def register(cp, body: dict[str, object], **headers: str) -> httpx.Response:
    return httpx.put(cp.url + "/v1/registry/register", json=body, headers=auth(**headers))


def listed(cp, service: str) -> list[dict[str, object]]:
    return list(httpx.get(cp.url + f"/v1/registry/services/{service}").json()["instances"])


VICTIM = {"id": "payments-1", "service": "payments", "address": "127.0.0.1", "port": 8001, "ttl": "30s",
          "meta": {"mesh_tls": "strict"}}


def test_another_token_holder_cannot_overwrite_heartbeat_or_deregister_an_instance(cp):
    owner = register(cp, VICTIM)
    assert owner.status_code == 200
    secret = owner.json()["secret"]
    assert len(secret) >= 20

    hijack = {**VICTIM, "address": "127.0.0.2", "meta": {"mesh_tls": "off"}}
    r = register(cp, hijack)  # same id, no secret: the shared bootstrap token is not enough
    assert r.status_code == 409 and "x-mesh-instance-secret" in r.json()["error"]
    r = register(cp, hijack, **{"x-mesh-instance-secret": "guess"})
    assert r.status_code == 409
    moved = register(cp, {**VICTIM, "service": "ledger"})  # move it to another service
    assert moved.status_code == 409
    assert httpx.put(cp.url + "/v1/registry/heartbeat/payments-1", headers=auth()).status_code == 403
    assert httpx.delete(cp.url + "/v1/registry/payments-1", headers=auth()).status_code == 403
    assert httpx.delete(cp.url + "/v1/registry/payments-1",
                        headers=auth(**{"x-mesh-instance-secret": "wrong"})).status_code == 403
    # nothing changed
    [entry] = listed(cp, "payments")
    assert entry["address"] == "127.0.0.1" and entry["meta"] == {"mesh_tls": "strict"}
    assert listed(cp, "ledger") == []

    # the owner can do all of it
    mine = {"x-mesh-instance-secret": secret}
    assert register(cp, {**VICTIM, "port": 8002}, **mine).status_code == 200
    assert httpx.put(cp.url + "/v1/registry/heartbeat/payments-1", headers=auth(**mine)).status_code == 200
    assert [e["port"] for e in listed(cp, "payments")] == [8002]
    assert httpx.delete(cp.url + "/v1/registry/payments-1", headers=auth(**mine)).status_code == 200
    assert listed(cp, "payments") == []


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("address", "0.0.0.0", "unspecified"),
        ("address", "::", "unspecified"),
        ("address", "169.254.169.254", "link-local"),
        ("address", "fe80::1", "link-local"),
        ("address", "bad host name!", "neither an IP"),
        ("port", 0, "port"),
        ("port", 70000, "port"),
        ("ttl", "1" + "0" * 400 + "s", "ttl"),
        ("ttl", "2h", "at most 1h"),
        ("ttl", float("nan"), "ttl"),
        ("id", "x" * 500, "id"),
        ("tags", ["t"] * 100, "tags"),
    ],
)
def test_bad_registrations_are_400_and_not_listed(cp, field, value, message):
    body = {**VICTIM, "id": "p-bad", field: value}
    r = httpx.put(cp.url + "/v1/registry/register", content=_json(body), headers=auth())
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]
    assert listed(cp, "payments") == []


def _json(body: dict[str, object]) -> bytes:
    import json

    return json.dumps(body, allow_nan=True).encode()


def test_unsafe_addresses_only_when_explicitly_allowed(control_plane, tmp_path):
    cp = control_plane(tmp_path / "allowing", bootstrap_token=TOKEN, extra_args=("--allow-unsafe-addresses",))
    assert register(cp, {**VICTIM, "address": "169.254.10.10"}).status_code == 200


def test_registration_bodies_are_bounded(cp):
    r = httpx.put(cp.url + "/v1/registry/register", content=b"{" + b" " * (1 << 20) + b"}", headers=auth())
    assert r.status_code == 413


def test_without_a_token_only_loopback_may_write():
    """Same app, a request that comes from another machine (the ASGI client address), and from loopback."""
    plane = ControlPlane(SQLiteRulesStore(":memory:"), registry_token=None)
    app = build_app(plane)

    async def attempt(client_host: str) -> int:
        transport = httpx.ASGITransport(app=app, client=(client_host, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://cp") as client:
            r = await client.put("/v1/registry/register", json=VICTIM)
            if r.status_code == 403:
                assert "MESH_BOOTSTRAP_TOKEN" in r.json()["error"]
            return r.status_code

    assert asyncio.run(attempt("10.1.2.3")) == 403
    assert plane.registry.instances("payments") == []
    assert asyncio.run(attempt("127.0.0.1")) == 200


def test_refuses_to_listen_beyond_loopback_without_a_token(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "meshlib.cli", "serve", "--host", "0.0.0.0", "--port", "0",
         "--state-dir", str(tmp_path / "cp")],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode != 0
    assert "MESH_BOOTSTRAP_TOKEN" in proc.stderr and "--insecure" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_token_less_control_plane_warns_loudly(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshlib.cli", "serve", "--port", "0", "--state-dir", str(tmp_path / "cp")],
        stderr=subprocess.PIPE, text=True, env={"PATH": "/usr/bin:/bin"},
    )
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        wait_for(lambda: lines.append(proc.stderr.readline()) or "listening on" in lines[-1], timeout=30,
                 what="meshctl serve to start")
        text = "".join(lines)
        assert "MESH_BOOTSTRAP_TOKEN is not set" in text and "loopback" in text
    finally:
        proc.terminate()
        proc.wait(10)


def test_unknown_service_names_keep_no_state():
    """Reading names nobody registered must not grow the registry (today: +157 MB for 20,000 names)."""
    registry = Registry()
    for i in range(20_000):
        index, body = registry.encoded(f"nobody-{i}")
        assert index == 1 and b'"instances": []' in body
    assert registry._cache == {} and registry._service_index == {}


@pytest.mark.parametrize("header", [None, "Bearer wrong-token", "Basic " + TOKEN, "Bearer"])
def test_registry_writes_need_the_bootstrap_token(cp, header):
    headers = {"authorization": header} if header else {}
    r = httpx.put(cp.url + "/v1/registry/register", json=VICTIM, headers=headers)
    assert r.status_code == 401 and "MESH_BOOTSTRAP_TOKEN" in r.json()["error"]
    assert httpx.put(cp.url + "/v1/registry/heartbeat/payments-1", headers=headers).status_code == 401
    assert httpx.delete(cp.url + "/v1/registry/payments-1", headers=headers).status_code == 401
    assert listed(cp, "payments") == []
    assert register(cp, VICTIM).status_code == 200  # the right token works
