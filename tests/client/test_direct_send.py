"""The mesh clients' own last steps of a send (client/direct_send.py) keep everything httpx's steps do, for mesh
hosts: auth of every kind, event hooks, redirects followed or handed back, the "HTTP Request" log line, the
request named in errors, elapsed time for bodies read later, the sync/async stream check, and the cookie jar.
Against a real upstream, sync and async alike."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Generator, Iterator
from typing import Any

import httpx
import pytest

import meshlib
from conftest import static_mesh
from harness import Upstream, free_port
from meshlib.client import direct_send

pytestmark = pytest.mark.e2e  # a real upstream process


class _TokenAuth(httpx.Auth):
    """A custom auth flow: a header on the first try, and once more with another header after a 302."""

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["X-Token"] = "first"
        response = yield request
        if response.status_code == 302:
            request.headers["X-Token"] = "again"
            yield request


def _mesh(port: int) -> meshlib.Mesh:
    return static_mesh({"svc": [port], "dead": [free_port()]}, telemetry=False)


def test_this_httpx_sends_as_the_direct_steps_do() -> None:
    assert direct_send.DIRECT_SEND, f"httpx {httpx.__version__} is not one the direct steps follow: they are off"


async def _checks(seen: list[Any], send: Any) -> None:
    """The same checks for both clients; ``await send(method, url, **kwargs)`` returns a read response."""
    echo = (await send("GET", "http://svc/echo")).json()
    assert echo["headers"]["authorization"] == "Basic dTpw"  # the client's auth=("u", "p")
    assert seen == [("request", "/echo"), ("response", 200)]
    assert "authorization" not in (await send("GET", "http://svc/echo", auth=None)).json()["headers"]
    assert (await send("GET", "http://x:y@svc/echo", auth=None)).json()["headers"]["authorization"] == "Basic eDp5"

    handed = await send("GET", "http://svc/-/redirect?to=/echo", follow_redirects=False)
    assert (handed.status_code, str(handed.next_request.url), handed.history) == (302, "http://svc/echo", [])
    followed = await send("GET", "http://svc/-/redirect?to=/echo", follow_redirects=True)
    assert (followed.json()["path"], [r.status_code for r in followed.history]) == ("/echo", [302])
    token = await send("GET", "http://svc/-/redirect?to=/echo", auth=_TokenAuth())
    assert token.request.headers["X-Token"] == "again"

    large = await send("GET", "http://svc/-/download?size=200000")  # past the size read inside the attempt
    assert (len(large.content), large.is_closed, large.elapsed.total_seconds() > 0) == (200000, True, True)
    small = await send("GET", "http://svc/-/download?size=10")
    assert small.elapsed.total_seconds() > 0
    assert small.default_encoding == "latin-1"  # the client's default_encoding
    assert small.request.url == "http://svc/-/download?size=10"


def test_the_sync_client_keeps_httpx_s_send(upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[Any] = []
    hooks = {
        "request": [lambda r: seen.append(("request", r.url.path))],
        "response": [lambda r: seen.append(("response", r.status_code))],
    }
    mesh = _mesh(upstream.port)
    with mesh.client(auth=("u", "p"), event_hooks=hooks, timeout=10, default_encoding="latin-1") as client:

        async def send(method: str, url: str, **kwargs: Any) -> httpx.Response:
            return client.request(method, url, **kwargs)  # (blocking, one at a time)

        with caplog.at_level(logging.INFO, logger="httpx"):
            asyncio.run(_checks(seen, send))
        assert 'HTTP Request: GET http://svc/echo "HTTP/1.1 200 OK"' in caplog.messages

        with client.stream("GET", "http://svc/-/download?size=100") as streamed:
            with pytest.raises(RuntimeError):
                _ = streamed.elapsed  # httpx: known only once the body is read
            streamed.read()
            assert streamed.elapsed.total_seconds() > 0

        request = client.build_request("GET", "http://dead/x")
        with pytest.raises(httpx.ConnectError) as failed:
            client.send(request)
        assert failed.value.request is request

        async def body() -> AsyncIterator[bytes]:
            yield b"x"

        with pytest.raises(RuntimeError, match="async request with a sync Client"):
            client.send(httpx.Request("POST", "http://svc/x", content=body()))
    mesh.close()


def test_the_async_client_keeps_httpx_s_send(upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[Any] = []

    async def on_request(request: httpx.Request) -> None:
        seen.append(("request", request.url.path))

    async def on_response(response: httpx.Response) -> None:
        seen.append(("response", response.status_code))

    mesh = _mesh(upstream.port)

    async def main() -> None:
        hooks = {"request": [on_request], "response": [on_response]}
        async with mesh.async_client(auth=("u", "p"), event_hooks=hooks, timeout=10, default_encoding="latin-1") as c:
            await _checks(seen, c.request)
            async with c.stream("GET", "http://svc/-/download?size=100") as streamed:
                with pytest.raises(RuntimeError):
                    _ = streamed.elapsed
                await streamed.aread()
                assert streamed.elapsed.total_seconds() > 0
            request = c.build_request("GET", "http://dead/x")
            with pytest.raises(httpx.ConnectError) as failed:
                await c.send(request)
            assert failed.value.request is request

            def body() -> Iterator[bytes]:
                yield b"x"

            with pytest.raises(RuntimeError, match="sync request with an AsyncClient"):
                await c.send(httpx.Request("POST", "http://svc/x", content=body()))

    with caplog.at_level(logging.INFO, logger="httpx"):
        asyncio.run(asyncio.wait_for(main(), 60))
    assert 'HTTP Request: GET http://svc/echo "HTTP/1.1 200 OK"' in caplog.messages
    mesh.close()


def test_cookies_set_by_a_mesh_service_are_kept_and_sent_back(upstream: Upstream, bare_built: list[str]) -> None:
    mesh = _mesh(upstream.port)
    with mesh.client(timeout=10) as client:
        assert "cookie" not in client.get("http://svc/echo").json()["headers"]
        assert client.get("http://svc/-/set-cookie?sid=abc&team=a").status_code == 200
        assert dict(client.cookies) == {"sid": "abc", "team": "a"}
        assert client.get("http://svc/echo").json()["headers"]["cookie"] == "sid=abc; team=a"
    assert bare_built == ["GET", "GET"]  # the bare way until the jar holds a cookie

    async def main() -> dict[str, Any]:
        async with mesh.async_client(timeout=10) as client:
            await client.get("http://svc/-/set-cookie?sid=xyz")
            answer: dict[str, Any] = (await client.get("http://svc/echo")).json()
            return answer

    assert asyncio.run(asyncio.wait_for(main(), 30))["headers"]["cookie"] == "sid=xyz"
    mesh.close()
