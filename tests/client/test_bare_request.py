"""The commonest mesh call's request is built past ``httpx.Request.__init__`` and its answers are checked for
``Set-Cookie`` without decoding every header: both stay invisible to callers. The request is the one httpx's own
``build_request`` gives, and the general path serves everything else (cookies round-trip through a real server in
test_direct_send.py)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

import meshlib
from conftest import static_mesh
from meshlib.client import bare_request, clients


def _mesh() -> meshlib.Mesh:
    return static_mesh({"svc": [1]}, telemetry=False)  # (requests are built, never sent)


def _seen(request: httpx.Request) -> dict[str, Any]:
    """Everything a transport, an event hook or an auth flow can observe of a request before it is sent."""
    return {
        "method": request.method,
        "url": str(request.url),
        "headers": request.headers.raw,
        "extensions": request.extensions,
        "content": request.read(),
        "stream": type(request.stream),
        "streamed": list(request.stream),  # type: ignore[arg-type]
        "attributes": sorted(vars(request)),
    }


def test_this_httpx_builds_requests_the_bare_way() -> None:
    assert bare_request.BARE_REQUESTS, "bare_request no longer matches this httpx's build_request: it is turned off"
    assert clients._LOWERED_NAMES, "this httpx keeps header names otherwise: cookies are looked for the public way"


@pytest.mark.parametrize("method", ["GET", "get", "POST", "put", "PATCH", "DELETE", "HEAD", "OPTIONS"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"headers": {"Authorization": "Bearer x", "X-Team": "a"}},
        {"headers": {"Host": "elsewhere"}},
        {"headers": {"Content-Length": "0"}},
        {"timeout": 3.5},
        {"timeout": httpx.Timeout(1, read=9)},
    ],
)
def test_a_bare_request_is_the_one_httpx_builds(bare_built: list[str], method: str, options: dict[str, Any]) -> None:
    mesh = _mesh()
    with mesh.client(**options) as meshed, httpx.Client(**options) as plain:
        for url in ("http://svc/v1/items?id=7", "http://svc:8080/", httpx.URL("http://svc.mesh/a%20b")):
            assert _seen(meshed.build_request(method, url)) == _seen(plain.build_request(method, url))
    mesh.close()
    assert len(bare_built) == 3  # every one of them took the bare way


@pytest.mark.parametrize(
    "kwargs",
    [
        {"headers": {"X-A": "1"}},
        {"params": {"page": "2"}},
        {"cookies": {"sid": "1"}},
        {"json": {"a": 1}},
        {"content": b"body"},
        {"data": {"a": "1"}},
        {"files": {"f": b"x"}},
        {"timeout": 2.0},
        {"extensions": {"trace": print}},
    ],
)
def test_a_request_with_anything_of_its_own_takes_httpx_s_way(bare_built: list[str], kwargs: dict[str, Any]) -> None:
    mesh = _mesh()
    with mesh.client() as meshed, httpx.Client() as plain:
        ours = _seen(meshed.build_request("POST", "http://svc/x", **kwargs))
        theirs = _seen(plain.build_request("POST", "http://svc/x", **kwargs))
        if "files" in kwargs:  # a fresh multipart boundary each time
            ours["headers"] = theirs["headers"] = ours["content"] = theirs["content"] = ours["streamed"] = None
            theirs["streamed"] = None
        assert ours == theirs
    mesh.close()
    assert bare_built == []


def test_a_bare_request_s_headers_are_its_own(bare_built: list[str]) -> None:
    """Headers set on one request (as the mesh sets its own on every call) never reach the client or the next."""
    mesh = _mesh()
    for client_headers in ({}, {"Host": "svc", "Content-Length": "0"}):  # with and without headers httpx adds
        with mesh.client(headers=client_headers) as client:
            before = client.headers.raw
            first = client.build_request("POST", "http://svc/x")
            first.headers["X-Only-Here"] = "1"
            first.headers.raw.append((b"x-raw", b"2"))
            assert client.headers.raw == before
            assert "x-only-here" not in client.build_request("POST", "http://svc/x").headers
    mesh.close()
    assert bare_built == ["POST"] * 4


def test_hosts_outside_the_mesh_and_clients_with_params_or_cookies_take_httpx_s_way(bare_built: list[str]) -> None:
    mesh = _mesh()
    with mesh.client() as client:
        client.build_request("GET", "http://example.com/x")
        client.build_request("GET", "http://127.0.0.1:8/x")
    with mesh.client(base_url="http://svc/api/") as client:
        assert str(client.build_request("GET", "users/9").url) == "http://svc/api/users/9"
    with mesh.client(params={"v": "2"}) as client:
        assert str(client.build_request("GET", "http://svc/x").url) == "http://svc/x?v=2"
    with mesh.client(cookies={"sid": "s"}) as client:
        assert client.build_request("GET", "http://svc/x").headers["cookie"] == "sid=s"
    assert bare_built == []
    with mesh.client(base_url="http://svc/api/") as client:  # an absolute URL on a base_url client: bare
        assert str(client.build_request("GET", "http://svc/other").url) == "http://svc/other"
    assert bare_built == ["GET"]
    mesh.close()


def test_an_answer_sets_cookies_under_any_spelling_of_the_header(monkeypatch: pytest.MonkeyPatch) -> None:
    for lowered in (True, False):  # the lower-cased names httpx keeps, and the public way it falls back to
        monkeypatch.setattr(clients, "_LOWERED_NAMES", lowered)
        for name in ("Set-Cookie", "set-cookie", "SET-COOKIE2"):
            assert clients._sets_cookies(httpx.Headers([("X-A", "1"), (name, "a=b")]))
        assert not clients._sets_cookies(httpx.Headers([("X-Set-Cookie", "a=b"), ("Cookie", "a=b")]))
        assert not clients._sets_cookies(httpx.Headers())
