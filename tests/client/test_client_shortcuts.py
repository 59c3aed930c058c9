"""The mesh clients' two shortcuts past httpx's slow parts stay invisible to callers: a body read inside the attempt
is the response httpx's own read gives, and a URL string parsed once before builds the request a fresh parse
would."""

from __future__ import annotations

import asyncio

import httpx
import pytest

import meshlib
from harness import Upstream
from meshlib.client import clients, streams
from meshlib.discovery import StaticDiscovery
from meshlib.endpoints import Endpoint

pytestmark = pytest.mark.e2e  # its tests start processes (servers, a control plane, meshctl)


def _mesh(port: int) -> meshlib.Mesh:
    return meshlib.Mesh(
        service="t",
        control_plane="",
        telemetry=False,
        discovery=StaticDiscovery({"svc": [Endpoint("127.0.0.1", port)]}),
    )


async def _state(response: httpx.Response) -> dict[str, object]:
    """Everything a caller can observe of a read response, including reading it again."""
    with pytest.raises(httpx.StreamConsumed):
        list(response.iter_raw())
    return {
        "status": response.status_code,
        "content": response.content,
        "text": response.text,
        "downloaded": response.num_bytes_downloaded,
        "closed": response.is_closed,
        "consumed": response.is_stream_consumed,
        "length": response.headers["content-length"],
        "pieces": list(response.iter_bytes(chunk_size=300)),
        "async pieces": [p async for p in response.aiter_bytes(chunk_size=700)],
        "aread": await response.aread(),
        "elapsed": response.elapsed.total_seconds() > 0,
        "version": response.http_version,
    }


def test_a_body_read_inside_the_attempt_is_the_response_httpx_would_give(upstream: Upstream) -> None:
    assert streams._DIRECT_READ, "this httpx's responses no longer match the direct read: it is turned off"

    async def main() -> None:
        mesh = _mesh(upstream.port)
        async with mesh.async_client(timeout=10) as meshed, httpx.AsyncClient(timeout=10) as plain:
            for size in (0, 1000, 40_000):  # empty, whole with the head, and read after it
                path = f"/-/download?size={size}"
                ours = await _state(await meshed.get(f"http://svc{path}"))
                theirs = await _state(await plain.get(f"http://127.0.0.1:{upstream.port}{path}"))
                assert ours == theirs, size
                assert ours["downloaded"] == size
        mesh.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_the_sync_client_hands_over_the_same_responses(upstream: Upstream) -> None:
    def state(response: httpx.Response) -> dict[str, object]:
        with pytest.raises(httpx.StreamConsumed):
            list(response.iter_raw())
        return {
            "content": response.content,
            "downloaded": response.num_bytes_downloaded,
            "closed": response.is_closed,
            "consumed": response.is_stream_consumed,
            "pieces": list(response.iter_bytes(chunk_size=300)),
            "again": response.read(),
            "elapsed": response.elapsed.total_seconds() > 0,
        }

    mesh = _mesh(upstream.port)
    with mesh.client(timeout=10) as meshed, httpx.Client(timeout=10) as plain:
        for size in (0, 1000, 65536, 70_000):  # read inside the attempt up to 64 KiB, streamed past it
            path = f"/-/download?size={size}"
            assert state(meshed.get(f"http://svc{path}")) == state(plain.get(f"http://127.0.0.1:{upstream.port}{path}"))
    mesh.close()


def test_read_response_falls_back_to_httpx_for_encoded_bodies_and_when_turned_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gzip

    packed = gzip.compress(b"hello mesh")
    encoded = streams.read_response(200, [(b"Content-Encoding", b"gzip")], packed, {})
    assert (encoded.content, encoded.num_bytes_downloaded) == (b"hello mesh", len(packed))
    monkeypatch.setattr(streams, "_DIRECT_READ", False)
    plain = streams.read_response(200, [(b"content-length", b"2")], b"ok", {})
    assert (plain.content, plain.num_bytes_downloaded, plain.is_closed) == (b"ok", 2, True)


def test_a_url_string_is_parsed_once_and_builds_the_same_request() -> None:
    clients._parsed_url.cache_clear()
    mesh = _mesh(1)
    with mesh.client(base_url="http://svc/api/") as client:
        first = client.build_request("GET", "http://svc/v1/items?id=7", params={"page": "2"})
        again = client.build_request("GET", "http://svc/v1/items?id=7", params={"page": "2"})
        relative = client.build_request("GET", "users/9")
        assert clients._parsed_url.cache_info().hits == 1
        fresh = httpx.Client(base_url="http://svc/api/")  # httpx: params replace the query
        assert (
            str(first.url)
            == str(again.url)
            == str(fresh.build_request("GET", "http://svc/v1/items?id=7", params={"page": "2"}).url)
            == "http://svc/v1/items?page=2"
        )
        assert str(relative.url) == "http://svc/api/users/9"
        for _ in range(2):  # a bad URL is an error every time, never a cached answer
            with pytest.raises(httpx.InvalidURL):
                client.build_request("GET", "http://svc:abc/")
        fresh.close()
    mesh.close()
    assert clients._parsed_url.cache_info().maxsize == 512  # bounded: endless distinct URLs keep only the latest
