"""Attack: feed discovery hostile data (a corrupt cache on disk, a registry answering garbage). The watch must not
die, the last good endpoints must stay, and the error a caller sees must say what went wrong and where."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import meshlib
from harness import ThreadedServer, free_port, wait_for
from meshlib.discovery.registry import RegistryDiscovery
from meshlib.endpoints import SnapshotError, parse_snapshot

pytestmark = pytest.mark.e2e  # its tests start processes (servers, a control plane, meshctl)


def _mesh(discovery: RegistryDiscovery) -> meshlib.Mesh:
    """A mesh on ``discovery`` that waits 1 s (not 5) for a first answer."""
    settings = replace(meshlib.MeshSettings.from_env(service="caller", control_plane=""), discovery_timeout=1.0)
    return meshlib.Mesh(discovery=discovery, settings=settings)


@pytest.mark.parametrize(
    "cached",
    [{"instances": 5}, {"instances": [{"address": 5, "port": "x"}]}, [1, 2], "text", {"instances": [None]}],
)
def test_a_corrupt_cache_does_not_kill_the_watch(cached, control_plane, upstreams, tmp_path):
    from meshlib.state import source_key

    port = free_port()  # the registry is down at first
    state = tmp_path / "state"
    cache = state / "endpoints" / source_key(f"http://127.0.0.1:{port}")
    cache.mkdir(parents=True)
    (cache / "payments.json").write_text(json.dumps(cached))
    discovery = RegistryDiscovery(f"http://127.0.0.1:{port}", state_dir=str(state), wait=1.0)
    with _mesh(discovery) as mesh, mesh.client() as client:
        with pytest.raises(meshlib.NoEndpointsError) as info:
            client.get("http://payments/x")
        assert f"registry at http://127.0.0.1:{port}" in str(info.value)  # the last error, with where it came from

        # the registry comes back: the same watch thread picks the service up
        cp = control_plane(port=port)
        upstream = upstreams(1)[0]
        r = httpx.put(
            cp.url + "/v1/registry/register",
            json={"service": "payments", "address": "127.0.0.1", "port": upstream.port},
        )
        assert r.status_code == 200
        wait_for(lambda: _ok(client), timeout=20, what="calls to succeed once the registry is back")


def _ok(client: meshlib.Client) -> bool:
    try:
        return client.get("http://payments/x").status_code == 200
    except meshlib.MeshError:
        return False


def _watch_answer(service_body: bytes) -> bytes:
    return b'{"index": 3, "services": {"payments": ' + service_body + b"}}"


ANSWERS = {
    "not-json": (b"{nope", "invalid JSON"),
    "instances-not-a-list": (_watch_answer(b'{"index": 3, "instances": 5}'), "instances must be a list"),
    "bad-port": (_watch_answer(b'{"index": 3, "instances": [{"address": "127.0.0.1", "port": 0}]}'), "port"),
    "bad-address": (_watch_answer(b'{"index": 3, "instances": [{"address": "a b", "port": 80}]}'), "address"),
    "bad-tags": (
        _watch_answer(b'{"index": 3, "instances": [{"address": "127.0.0.1", "port": 80, "tags": "v1"}]}'),
        "tags",
    ),
    "no-index": (b'{"services": {}}', "index"),
    "no-services": (b'{"index": 4}', "services"),
    "deep": (b"[" * 100000 + b"]" * 100000, "invalid JSON"),
}


def fake_registry(answer: Callable[[], bytes]) -> ThreadedServer:
    async def watch(request: Request) -> Response:
        return Response(answer(), media_type="application/json")

    return ThreadedServer(Starlette(routes=[Route("/v1/registry/watch", watch, methods=["POST"])]))


@pytest.mark.parametrize("kind", sorted(ANSWERS))
def test_a_registry_answering_garbage_is_named_in_the_error(kind, tmp_path):
    body, expected = ANSWERS[kind]
    server = fake_registry(lambda: body)
    try:
        discovery = RegistryDiscovery(server.url, state_dir=str(tmp_path / "s"), wait=1.0)
        with _mesh(discovery) as mesh, mesh.client() as client, pytest.raises(meshlib.NoEndpointsError) as info:
            client.get("http://payments/x")
        message = str(info.value)
        assert f"registry at {server.url}" in message and expected in message, message
    finally:
        server.stop()


def test_a_bad_answer_never_replaces_the_last_good_snapshot(tmp_path):
    """Good answer, then garbage: the good endpoints stay in force."""
    answers = [
        _watch_answer(b'{"index": 2, "instances": [{"address": "127.0.0.1", "port": 9001}]}'),
        _watch_answer(b'{"index": 3, "instances": 7}'),
    ]
    server = fake_registry(lambda: answers[0] if len(answers) == 1 else answers.pop(0))
    try:
        discovery = RegistryDiscovery(server.url, wait=0.2)
        seen = []
        discovery.watch("payments", seen.append)
        wait_for(lambda: discovery.last_error("payments") is not None, what="the garbage answer to be refused")
        assert [e.port for e in seen[-1].endpoints] == [9001]
        assert [e.port for e in discovery.current("payments").endpoints] == [9001]  # type: ignore[union-attr]
        discovery.close()
    finally:
        server.stop()


def test_snapshot_validation_is_whole():
    with pytest.raises(SnapshotError, match=r"instances\[1\]: port"):
        parse_snapshot(
            "s", {"instances": [{"address": "10.0.0.1", "port": 80}, {"address": "10.0.0.2", "port": -1}]}, 1
        )
    ok = parse_snapshot(
        "s",
        {
            "instances": [
                {"address": "pay-1.internal", "port": 80, "tags": ["v1"], "meta": {"mesh_tls": "strict"}, "id": "x"}
            ]
        },
        1,
    )
    assert ok.endpoints[0].address == "pay-1.internal"


def test_saved_state_dir_files_are_only_ever_data(tmp_path: Path):
    """The cache of a good answer round-trips through the same validation."""
    from meshlib.endpoints import Endpoint, EndpointSet, snapshot_to_json

    snap = EndpointSet.of("s", [Endpoint("127.0.0.1", 80, frozenset({"v1"}), {"k": "v"}, id="a")], 4)
    assert parse_snapshot("s", json.loads(json.dumps(snapshot_to_json(snap))), 4).same_members(snap)


def test_discovery_errors_are_never_empty():
    from meshlib.wire import error_text

    expected = "discovery connection pool exhausted with 300 watches (PoolTimeout)"
    assert error_text(httpx.PoolTimeout(""), 300) == expected
    assert error_text(httpx.ReadTimeout("")) == "ReadTimeout"
    assert error_text(httpx.ConnectError("All connection attempts failed")) == (
        "ConnectError: All connection attempts failed"
    )


@pytest.mark.parametrize(
    "address",
    ["2852039166", "0xa9fea9fe", "0251.0376.0251.0376", "::ffff:169.254.169.254", "0", "169.254.169.254", "0.0.0.0"],
)
def test_clients_never_list_an_unsafe_address_whatever_its_spelling(address):
    """A registry (or Consul) answer naming the metadata address in another spelling: that instance is left out,
    the others are used, and nothing is ever dialed there."""
    answer = {
        "instances": [
            {"id": "evil", "address": address, "port": 80},
            {"id": "good", "address": "127.0.0.1", "port": 8001},
            {"id": "odd", "address": "2130706433", "port": 8002},
        ]
    }
    snapshot = parse_snapshot("payments", answer, 3)
    assert sorted((e.address, e.port) for e in snapshot.endpoints) == [("127.0.0.1", 8001), ("127.0.0.1", 8002)]


def test_the_consul_backend_leaves_out_unsafe_addresses_too():
    from meshlib.discovery.consul import _endpoints

    entries = [
        {"Node": {"Address": "10.0.0.5"}, "Service": {"ID": "a", "Address": "0xa9fea9fe", "Port": 80}},
        {"Node": {"Address": "0"}, "Service": {"ID": "b", "Address": "", "Port": 81}},
        {"Node": {"Address": "127.0.0.1"}, "Service": {"ID": "c", "Address": "", "Port": 8001}},
    ]
    snapshot = _endpoints("payments", entries, 7)
    assert [(e.address, e.port) for e in snapshot.endpoints] == [("127.0.0.1", 8001)]
