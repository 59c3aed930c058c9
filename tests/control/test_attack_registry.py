"""Attack: take over or pollute the embedded registry. Registrations are owned (a per-instance secret), addresses
are checked, TTLs are bounded, and without a bootstrap token only this machine may write."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import httpx
import pytest

from harness import startup_lines, wait_for
from meshlib.control.app import ControlPlane, build_app
from meshlib.control.registry import Registry
from meshlib.control.store import SQLiteRulesStore

pytestmark = pytest.mark.e2e  # its tests start processes (servers, a control plane, meshctl)

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


VICTIM = {
    "id": "payments-1",
    "service": "payments",
    "address": "127.0.0.1",
    "port": 8001,
    "ttl": "30s",
    "meta": {"mesh_tls": "strict"},
}


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
    assert (
        httpx.delete(
            cp.url + "/v1/registry/payments-1", headers=auth(**{"x-mesh-instance-secret": "wrong"})
        ).status_code
        == 403
    )
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
        # other spellings of the same addresses, as connect() reads them
        ("address", "2852039166", "link-local"),
        ("address", "0xa9fea9fe", "link-local"),
        ("address", "0251.0376.0251.0376", "link-local"),
        ("address", "::ffff:169.254.169.254", "link-local"),
        ("address", "0", "unspecified"),
        ("address", "0x0", "unspecified"),
        ("address", "224.0.0.1", "multicast"),
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


def test_numeric_spellings_are_stored_in_their_canonical_form(cp):
    assert register(cp, {**VICTIM, "address": "2130706433"}).status_code == 200  # 127.0.0.1, as connect() reads it
    [entry] = listed(cp, "payments")
    assert entry["address"] == "127.0.0.1"


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
        [
            sys.executable,
            "-m",
            "meshlib.cli",
            "serve",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--state-dir",
            str(tmp_path / "cp"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode != 0
    assert "MESH_BOOTSTRAP_TOKEN" in proc.stderr and "--insecure" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_token_less_control_plane_warns_loudly(tmp_path):
    text = startup_lines({"PATH": "/usr/bin:/bin"}, tmp_path / "cp")
    assert "MESH_BOOTSTRAP_TOKEN is not set" in text and "loopback" in text


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


def test_dns_rebinding_is_refused(control_plane):
    """A page from another host name, re-pointed at 127.0.0.1, reads /ui for its CSRF token and registers a fake
    payments as a local process (200 before). The control plane answers only the names it serves, and a browser's
    request is never trusted for coming from loopback."""
    cp = control_plane(bootstrap_token=None)
    rebound = {"host": f"evil.example:{cp.port}"}
    page = httpx.get(cp.url + "/ui", headers={**rebound, "sec-fetch-site": "same-origin"})
    assert page.status_code == 421 and "--allowed-host" in page.json()["error"]
    fake = {"service": "payments", "address": "127.0.0.1", "port": 8001}
    browser = {**rebound, "origin": f"http://evil.example:{cp.port}", "sec-fetch-site": "same-origin"}
    r = httpx.put(cp.url + "/v1/registry/register", json=fake, headers=browser)
    assert r.status_code == 421
    # even under a name it serves, a browser request gets no loopback trust (the page's CSRF token is not enough)
    csrf = httpx.get(cp.url + "/ui").text.split('name="mesh-csrf" content="', 1)[1].split('"', 1)[0]
    same = {"origin": f"http://127.0.0.1:{cp.port}", "sec-fetch-site": "same-origin", "x-mesh-csrf": csrf}
    r = httpx.put(cp.url + "/v1/registry/register", json=fake, headers=same)
    assert r.status_code == 403, r.text
    assert listed(cp, "payments") == []
    # tools on this machine are unaffected, by IP and by localhost
    assert httpx.put(cp.url + "/v1/registry/register", json=fake).status_code == 200
    assert httpx.get(f"http://localhost:{cp.port}/healthz").status_code == 200


def test_allowed_host_names_are_served(control_plane, tmp_path):
    cp = control_plane(tmp_path / "named", extra_args=("--allowed-host", "meshcp.internal"))
    assert httpx.get(cp.url + "/healthz", headers={"host": f"meshcp.internal:{cp.port}"}).status_code == 200
    assert httpx.get(cp.url + "/healthz", headers={"host": "other.internal"}).status_code == 421


def test_watches_naming_unknown_services_are_bounded(control_plane):
    """70 token-less watches naming 4,096 never-registered services each (1.27 MB a watch before, ~20 GB at the
    connection cap): the names all waiting watches hold are capped (503 past it), memory stays bounded, and a
    registry change is answered at once however many names wait."""
    import json
    import socket

    from harness import rss_mb
    from meshlib.control.registry_routes import MAX_WATCHED, MAX_WATCHED_TOTAL

    cp = control_plane()
    before = rss_mb(cp.proc.pid)
    socks = []
    try:
        for w in range(70):
            body = json.dumps({"services": [f"ghost-{w}-{i}" for i in range(MAX_WATCHED)]}).encode()
            s = socket.create_connection(("127.0.0.1", cp.port))
            s.sendall(
                b"POST /v1/registry/watch?index=5&wait=300s HTTP/1.1\r\nhost: localhost\r\n"
                b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body) + body
            )
            socks.append(s)
        refused = []

        def answered() -> bool:
            for s in socks:
                if s in refused:
                    continue
                s.settimeout(0.01)
                try:
                    data = s.recv(200)
                except TimeoutError:
                    continue
                assert data.startswith(b"HTTP/1.1 503"), data
                refused.append(s)
            return len(refused) >= 70 - MAX_WATCHED_TOTAL // MAX_WATCHED

        wait_for(answered, timeout=30, interval=0.1, what="the watches past the total to be refused")
        growth = rss_mb(cp.proc.pid) - before
        assert growth < 60, f"{70 - len(refused)} waiting watches hold {growth:.0f} MB"
        started = time.monotonic()
        r = httpx.put(cp.url + "/v1/registry/register", json={"service": "real", "address": "127.0.0.1", "port": 1})
        assert r.status_code == 200 and httpx.get(cp.url + "/healthz").status_code == 200
        assert time.monotonic() - started < 1.0
    finally:
        for s in socks:
            s.close()


def test_a_waiting_watch_sees_its_own_changes_only_and_catches_up_after_the_log():
    from meshlib.control.registry import CHANGE_LOG, parse_registration

    registry = Registry()
    check = registry.watch(frozenset({"payments"}), registry.index)
    registry.register(parse_registration({"service": "ledger", "address": "127.0.0.1", "port": 1}))
    assert not check()
    registry.register(parse_registration({"service": "payments", "address": "127.0.0.1", "port": 2}))
    assert check()
    behind = registry.watch(frozenset({"payments"}), registry.index)
    registry.register(parse_registration({"service": "payments", "address": "127.0.0.1", "port": 3}))
    for i in range(CHANGE_LOG + 10):  # the change to payments falls out of the log: the watch checks its names
        registry.register(parse_registration({"service": "ledger", "address": "127.0.0.1", "port": 10 + i}))
    assert behind()
