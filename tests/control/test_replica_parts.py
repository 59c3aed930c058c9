"""The parts of the replicated mode one at a time: the client's failover between replica URLs (real loopback
servers), the setting that lists them, and what a replica accepts from Consul KV (records are hostile data)."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from consul_double import ConsulDouble
from harness import ThreadedServer
from meshlib.control.registry import Instance, RegistrationError, Registry, parse_registration, secret_digest
from meshlib.control.registry_consul import ConsulRegistry, decode, encode
from meshlib.control.tokens_consul import ConsulTokenStore
from meshlib.errors import ConfigurationError
from meshlib.replicas import ReplicaSet, async_replica_client, replica_client
from meshlib.settings import MeshSettings, control_plane_urls, registry_of


def replica(name: str, status: int = 200) -> ThreadedServer:
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "replica": name,
                "path": request.url.path,
                "query": str(request.query_params),
                "host": request.headers["host"],
            },
            status_code=status,
        )

    return ThreadedServer(Starlette(routes=[Route("/{path:path}", echo, methods=["GET", "POST", "PUT"])]))


def dead_url() -> str:
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def servers():
    started: list[ThreadedServer] = []
    yield started
    for server in started:
        server.stop()


def test_requests_stay_on_one_replica_and_move_when_it_refuses_or_answers_503(servers):
    busy, good = replica("busy", 503), replica("good")
    servers += [busy, good]
    dead = dead_url()
    replicas = ReplicaSet([dead, busy.url, good.url], start=0)
    with replica_client([dead, busy.url, good.url], replicas=replicas, timeout=5) as http:
        r = http.post("/v1/registry/heartbeat/x?a=1", content=b"body")
        assert r.json() == {
            "replica": "good",
            "path": "/v1/registry/heartbeat/x",
            "query": "a=1",
            "host": f"127.0.0.1:{good.port}",
        }
        assert replicas.current == 2 and replicas.failovers == 2
        assert http.get("/again").json()["replica"] == "good"  # it stays where it works
        assert replicas.failovers == 2


def test_when_every_replica_fails_the_error_is_httpx_s_and_names_each_one():
    urls = [dead_url(), dead_url()]
    with replica_client(urls, timeout=2) as http, pytest.raises(httpx.ConnectError) as caught:
        http.get("/v1/rules")
    assert "every control-plane replica failed" in str(caught.value)
    for url in urls:
        assert url in str(caught.value)


def test_the_last_replica_s_503_is_the_answer(servers):
    busy = replica("busy", 503)
    servers.append(busy)
    with replica_client([dead_url(), busy.url], replicas=ReplicaSet([dead_url(), busy.url], start=0)) as http:
        assert http.get("/x").status_code == 503


def test_the_async_client_fails_over_too(servers):
    good = replica("good")
    servers.append(good)

    async def main() -> str:
        urls = [dead_url(), good.url]
        async with async_replica_client(urls, replicas=ReplicaSet(urls, start=0), timeout=5) as http:
            return str((await http.get("/w")).json()["replica"])

    assert asyncio.run(main()) == "good"


def test_one_url_is_a_plain_client():
    url = dead_url()
    with replica_client(url + "/", timeout=2) as http, pytest.raises(httpx.ConnectError) as caught:
        http.get("/v1/rules")
    assert str(http.base_url) == url and "replica" not in str(caught.value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("http://a:7400,cp:7400", "'cp:7400' is not one"),
        ("http://a:7400,http://a:7400", "listed twice"),
        ("http://a:7400/x,http://b:7400/y", "same path"),
        (" , ", r"expected an http\(s\):// URL"),
        ("http://a:99999", "Port out of range"),
    ],
)
def test_the_setting_names_what_is_wrong(value, message):
    with pytest.raises(ConfigurationError, match=message):
        control_plane_urls(value)


def test_several_urls_give_a_registry_at_each():
    settings = MeshSettings.from_env({"MESH_CONTROL_PLANE": "https://a:7400, https://b:7401"}, service="x")
    assert settings.discovery == "registry://a:7400,b:7401" == registry_of(settings.control_plane)


# -- what a replica reads from Consul -------------------------------------------------------------------------


def record(**changes) -> bytes:
    instance = parse_registration({"id": "p-1", "service": "payments", "address": "10.0.0.1", "port": 80})
    instance.digest = secret_digest("s")
    data = json.loads(encode(instance))
    data.update(changes)
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (record(address="169.254.169.254"), "address"),  # a replica's --allow-unsafe-addresses is never widened
        (record(digest="short"), "digest"),
        (record(port=0), "port"),
        (record(ttl="forever"), "ttl"),
        (record(extra=1), "unknown field"),
        (b"[" * 100_000, "oversized"),
        (b"{not json", "not JSON"),
    ],
)
def test_a_hostile_record_is_refused(raw, message):
    with pytest.raises(RegistrationError, match=message):
        decode(raw, allow_unsafe_addresses=False)


def test_a_replica_follows_only_valid_records_under_their_own_key():
    double = ConsulDouble()
    try:
        import consul

        client = consul.Consul(host="127.0.0.1", port=double.port)
        client.kv.put("p/registry/instances/p-1", record())
        client.kv.put("p/registry/instances/p-2", record())  # holds p-1: a copy under another key
        client.kv.put("p/registry/instances/bad", record(address="0.0.0.0"))
        view = Registry()
        registry = ConsulRegistry(client, "p", view)
        applied: list = []
        registry.follow(applied.append)
        from harness import wait_for

        wait_for(lambda: applied, timeout=5, what="a snapshot")
        applied[0]()
        assert [i.id for i in view.instances("payments")] == ["p-1"]
        assert registry.rejected == 2
        assert view.index > 10  # Consul's index, so every replica gives this change the same one
        registry.close()
    finally:
        double.stop()


def test_a_token_record_that_is_not_one_is_ignored():
    double = ConsulDouble()
    try:
        import consul

        client = consul.Consul(host="127.0.0.1", port=double.port)
        store = ConsulTokenStore(client, "p")
        token, made = store.create(["payments"])
        good = client.kv.get(f"p/tokens/{made.id}")[1]["Value"]
        widened = json.loads(good)
        widened["services"] = ["payments", "ledger"]
        client.kv.put("p/tokens/aaaaaaaaaaaa", json.dumps({**widened, "id": "bbbbbbbbbbbb"}))  # wrong key
        client.kv.put("p/tokens/cccccccccccc", json.dumps({**widened, "id": "cccccccccccc", "role": "root"}))
        again = ConsulTokenStore(client, "p")  # a second replica starting
        assert [r.id for r in again.records()] == [made.id]
        assert again.rejected == 2
        assert again.check(token).allows("payments")
        store.close()
        again.close()
    finally:
        double.stop()


def test_registry_writes_check_the_secret_against_the_shared_record():
    double = ConsulDouble()
    try:
        import consul

        from meshlib.control.registry import NotOwner

        client = consul.Consul(host="127.0.0.1", port=double.port)
        one, two = ConsulRegistry(client, "p", Registry()), ConsulRegistry(client, "p", Registry())
        instance = parse_registration({"id": "p-1", "service": "payments", "address": "10.0.0.1", "port": 80})
        secret = one.register(instance, None)
        assert two.heartbeat("p-1", secret)  # another replica takes its heartbeat, knowing only Consul
        with pytest.raises(NotOwner):
            two.heartbeat("p-1", "guess")
        with pytest.raises(NotOwner):
            two.register(Instance("p-1", "payments", "10.0.0.2", 80), None)  # a hijack through another replica
        assert not two.deregister("nobody", secret)
        assert two.deregister("p-1", secret)
        assert client.kv.get("p/registry/instances/p-1")[1] is None
    finally:
        double.stop()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_expiry_is_one_ttl_where_the_heartbeats_land_and_at_most_two_elsewhere():
    double = ConsulDouble()
    try:
        import consul

        client = consul.Consul(host="127.0.0.1", port=double.port)
        clock = Clock()
        here, there = (ConsulRegistry(client, "p", Registry(clock), clock=clock) for _ in range(2))
        instance = parse_registration(
            {"id": "p-1", "service": "payments", "address": "10.0.0.1", "port": 80, "ttl": "3s"}
        )
        secret = here.register(instance, None)
        here.load()
        there.load()
        # heartbeats keep landing on `here`; `there` checks the shared key each time its TTL lapses
        for _ in range(4):
            clock.now += 2.5
            assert here.heartbeat("p-1", secret)
            assert here.expire() == [] and there.expire() == []
        # the instance stops: `here` took the last heartbeat and drops it one TTL later
        clock.now += 2.9
        assert here.expire() == []
        clock.now += 0.2
        assert here.expire() == ["p-1"]
        assert client.kv.get("p/registry/instances/p-1")[1] is None

        # again, with the replica taking the heartbeats gone: the other one needs the key unchanged over a TTL
        secret = there.register(instance, None)
        there.load()
        survivor = ConsulRegistry(client, "p", Registry(clock), clock=clock)
        survivor.load()
        clock.now += 3.1
        assert survivor.expire() == []  # first look at the heartbeat key: taken as alive for another TTL
        clock.now += 3.1
        assert survivor.expire() == ["p-1"]
    finally:
        double.stop()
