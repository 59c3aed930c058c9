"""``meshlib.Client`` and ``meshlib.AsyncClient``: ``httpx.Client`` / ``httpx.AsyncClient`` whose requests to mesh
hosts go through the mesh transports."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import httpx

from .. import mirror  # noqa: F401  (registers the sender of mirrored copies, which only HTTP calls draw)
from ..runtime import Runtime
from .async_transport import AsyncMeshTransport
from .bare_request import BARE_REQUESTS as _BARE_REQUESTS
from .bare_request import bare_request
from .direct_send import DIRECT_SEND as _DIRECT_SEND
from .direct_send import asend_to_mesh, no_auth, send_to_mesh
from .external import ExternalCall
from .names import mesh_service_name
from .streams import streaming
from .transport import DEFAULT_LIMITS, MeshShell, MeshTransport


class _Cookies(httpx.Cookies):
    """httpx's cookie jar, without asking it about answers that set no cookie. httpx hands every response to
    ``http.cookiejar``, which builds a urllib request and an ``email.message`` for it whether or not it has
    ``Set-Cookie``: about a sixth of a mesh call's CPU at 64 calls in flight. The jar's contents are the same."""

    def extract_cookies(self, response: httpx.Response) -> None:
        if _sets_cookies(response.headers):
            super().extract_cookies(response)


_COOKIE_HEADERS = (b"set-cookie", b"set-cookie2")


def _names_kept_lowered() -> bool:
    """Whether this httpx keeps headers as ``_sets_cookies`` reads them, ``Headers._list`` of (name, lower-cased
    name, value): checked once, at import (an httpx that keeps them otherwise takes the public way)."""
    try:
        items = httpx.Headers([("Set-Cookie", "a"), ("X-B", "b")])._list
        return type(items) is list and [item[1] for item in items] == [b"set-cookie", b"x-b"]
    except Exception:
        return False


_LOWERED_NAMES = _names_kept_lowered()


def _sets_cookies(headers: httpx.Headers) -> bool:
    """Whether an answer sets a cookie. ``"set-cookie" in headers`` works out the headers' encoding (decoding every
    name and value) and builds a list of names, on every response; the lower-cased names are already there."""
    if _LOWERED_NAMES:
        for item in headers._list:  # noqa: SIM110  (a loop: no generator made per response)
            if item[1] in _COOKIE_HEADERS:
                return True
        return False
    return "set-cookie" in headers or "set-cookie2" in headers


#: Parsed URLs by their string: ``httpx.URL`` is immutable, and parsing one costs about 8 us (a twentieth of a
#: mesh call's CPU). Bounded: a client calling endless distinct URLs keeps only the most recent.
_parsed_url = functools.lru_cache(maxsize=512)(httpx.URL)


class _MeshRouting:
    """What both clients add to httpx: mesh hosts take the mesh transport, unless a ``transport=`` or a ``mounts=``
    entry of the caller's own serves them (httpx's rule: the caller's transport wins; the standard test set-up
    ``base_url="http://testserver"`` with ``MockTransport``/``WSGITransport`` keeps working). Proxies, from the
    environment or ``proxy=``, serve the hosts outside the mesh only: a mesh hop is never proxied. ``.mesh`` names
    the Mesh they go through; the cookie jar skips answers without cookies."""

    _transport: Any
    _mounts: dict[Any, Any]
    _cookies: httpx.Cookies
    headers: httpx.Headers
    _mesh_transport: MeshShell
    #: The caller gave ``transport=``: it serves every host, mesh names included.
    _own_transport: bool
    #: The patterns of the caller's ``mounts=``.
    _own_mounts: frozenset[str]

    def _route(self, mesh_transport: MeshShell, transport: Any, mounts: Any) -> None:
        self._mesh_transport = mesh_transport
        self._own_transport = transport is not None
        self._own_mounts = frozenset(mounts or ())

    @property
    def cookies(self) -> httpx.Cookies:
        return self._cookies

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        self._cookies = _Cookies(cookies)

    @property
    def mesh(self) -> Runtime:
        """The Mesh this client's mesh calls go through (the process default one unless ``mesh=`` was given)."""
        return self._mesh_transport.mesh

    @property
    def mesh_transport(self) -> MeshShell:
        """The transport that serves mesh hosts (httpx's own serves the others)."""
        return self._mesh_transport

    def build_request(
        self,
        method: str,
        url: Any,
        *,
        content: Any = None,
        data: Any = None,
        files: Any = None,
        json: Any = None,
        params: Any = None,
        headers: Any = None,
        cookies: Any = None,
        timeout: Any = httpx.USE_CLIENT_DEFAULT,
        extensions: Any = None,
    ) -> httpx.Request:
        if type(url) is str:  # a URL string seen before is not parsed again (aiohttp's yarl caches the same way)
            url = _parsed_url(url)
        if (
            _BARE_REQUESTS
            and content is None
            and data is None
            and files is None
            and json is None
            and params is None
            and headers is None
            and cookies is None
            and extensions is None
            and timeout is httpx.USE_CLIENT_DEFAULT
            and type(url) is httpx.URL
            and url.is_absolute_url
            and mesh_service_name(url.host) is not None
            and not self._params  # type: ignore[attr-defined]
            and not self._cookies
        ):
            return bare_request(method, url, self.headers, self.timeout)  # type: ignore[attr-defined]
        return super().build_request(  # type: ignore[misc, no-any-return]
            method,
            url,
            content=content,
            data=data,
            files=files,
            json=json,
            params=params,
            headers=headers,
            cookies=cookies,
            timeout=timeout,
            extensions=extensions,
        )

    def _merge_headers(self, headers: Any = None) -> Any:
        """With no per-request headers, the client's own: ``httpx.Request`` copies whatever it is given, so
        httpx's extra copy (and its update with nothing) is skipped."""
        if headers is None:
            return self.headers
        return super()._merge_headers(headers)  # type: ignore[misc]

    def _transport_for_url(self, url: httpx.URL) -> Any:
        if not self._own_transport and mesh_service_name(url.host) is not None:
            own = self._own_mounts
            if own:
                for pattern, transport in self._mounts.items():
                    if pattern.pattern in own and pattern.matches(url):
                        return self._transport if transport is None else transport
            return self._mesh_transport
        return super()._transport_for_url(url)  # type: ignore[misc]

    def _meshed(self, request: httpx.Request) -> bool:
        """Whether the mesh transport serves ``request`` (not the caller's transport, a mount, or httpx's own)."""
        return self._transport_for_url(request.url) is self._mesh_transport

    def _external_call(self, request: httpx.Request) -> ExternalCall | None:
        """A call httpx itself carries (outside the mesh, or to the caller's own transport or mount): traced and
        metered all the same (client/external.py). None: telemetry is off."""
        mesh = self._mesh_transport.mesh
        return ExternalCall(mesh, request) if mesh.telemetry is not None else None


def _unbound(response: httpx.Response) -> httpx.Response:
    """A response read whole, out of the reference cycle httpx leaves it in (its stream is wrapped in one that
    points back at the response, to time its close), so it is freed when the caller drops it rather than by the
    garbage collector: about 20 objects per call that otherwise wait for a collection, and 47 young-generation
    collections per 2,000 calls instead of 5. A closed response never touches its stream again (reads raise
    ``StreamConsumed`` first), so the wrapper's inner stream takes its place."""
    stream = response.stream
    if response.is_closed and type(stream) in _BOUND:
        inner = getattr(stream, "_stream", None)
        if inner is not None:
            response.stream = inner
    return response


_BOUND = tuple(
    getattr(httpx._client, name) for name in ("BoundSyncStream", "BoundAsyncStream") if hasattr(httpx._client, name)
)


def _own_request(exc: BaseException, request: httpx.Request) -> None:
    """An error of the traced copy names the caller's own request, as httpx's would."""
    if isinstance(exc, httpx.RequestError):
        exc.request = request


def _connection_options(
    verify: Any, cert: Any, http1: bool, http2: bool, limits: httpx.Limits, trust_env: bool
) -> dict[str, Any]:
    """The options httpx uses for its own transports, given to the mesh transport and to httpx alike."""
    return {"verify": verify, "cert": cert, "http1": http1, "http2": http2, "limits": limits, "trust_env": trust_env}


class Client(_MeshRouting, httpx.Client):
    """An ``httpx.Client`` whose requests to mesh hosts (``http://payments/...``) go through the mesh.

    Everything httpx accepts keeps working, with httpx's meaning: a ``transport=`` serves every host it is given
    for (mesh names too: pass none to use the mesh), a ``mounts=`` entry the hosts it matches, and proxies (the
    environment's, or ``proxy=``) the hosts outside the mesh. Mesh hosts otherwise take the mesh transport.
    """

    def __init__(
        self,
        *,
        mesh: Runtime | None = None,
        transport: httpx.BaseTransport | None = None,
        mounts: Mapping[str, httpx.BaseTransport | None] | None = None,
        verify: Any = True,
        cert: Any = None,
        http1: bool = True,
        http2: bool = False,
        limits: httpx.Limits = DEFAULT_LIMITS,
        trust_env: bool = True,
        **kwargs: Any,
    ) -> None:
        options = _connection_options(verify, cert, http1, http2, limits, trust_env)
        if isinstance(transport, MeshTransport):
            mesh_transport, transport = transport, None
        else:
            mesh_transport = MeshTransport(mesh, **options)
        super().__init__(transport=transport, mounts=mounts, **options, **kwargs)
        self._route(mesh_transport, transport, mounts)
        self.cookies = self._cookies

    def _send_handling_auth(
        self, request: httpx.Request, auth: httpx.Auth, follow_redirects: bool, history: list[httpx.Response]
    ) -> httpx.Response:
        if _DIRECT_SEND and no_auth(auth):  # its flow hands the request back once: no generator to run
            return self._send_handling_redirects(request, follow_redirects=follow_redirects, history=history)
        return super()._send_handling_auth(request, auth, follow_redirects, history)

    def _send_single_request(self, request: httpx.Request) -> httpx.Response:
        if self._meshed(request):
            if _DIRECT_SEND:
                return send_to_mesh(self, request)
            return super()._send_single_request(request)
        external = self._external_call(request)
        if external is None:
            return super()._send_single_request(request)
        try:
            response: httpx.Response = super()._send_single_request(external.request)
        except BaseException as exc:
            external.finish(None, exc)
            _own_request(exc, request)
            raise
        external.finish(response, None)
        response.request = request  # the caller's own, not the traced copy
        return response

    def send(self, request: httpx.Request, *, stream: bool = False, **kwargs: Any) -> httpx.Response:
        if not stream:
            return _unbound(super().send(request, **kwargs))
        token = streaming.set(True)  # the mesh transport then hands the body over unread (client/streams.py)
        try:
            return super().send(request, stream=True, **kwargs)
        finally:
            streaming.reset(token)

    def close(self) -> None:
        super().close()
        self._mesh_transport_close()

    def __exit__(self, *exc_info: Any) -> None:
        super().__exit__(*exc_info)
        self._mesh_transport_close()

    def _mesh_transport_close(self) -> None:
        transport = self._mesh_transport
        assert isinstance(transport, MeshTransport)
        transport.close()


class AsyncClient(_MeshRouting, httpx.AsyncClient):
    """The ``httpx.AsyncClient`` drop-in; see ``Client``."""

    def __init__(
        self,
        *,
        mesh: Runtime | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        mounts: Mapping[str, httpx.AsyncBaseTransport | None] | None = None,
        verify: Any = True,
        cert: Any = None,
        http1: bool = True,
        http2: bool = False,
        limits: httpx.Limits = DEFAULT_LIMITS,
        trust_env: bool = True,
        **kwargs: Any,
    ) -> None:
        options = _connection_options(verify, cert, http1, http2, limits, trust_env)
        if isinstance(transport, AsyncMeshTransport):
            mesh_transport, transport = transport, None
        else:
            mesh_transport = AsyncMeshTransport(mesh, **options)
        super().__init__(transport=transport, mounts=mounts, **options, **kwargs)
        self._route(mesh_transport, transport, mounts)
        self.cookies = self._cookies

    async def _send_handling_auth(
        self, request: httpx.Request, auth: httpx.Auth, follow_redirects: bool, history: list[httpx.Response]
    ) -> httpx.Response:
        if _DIRECT_SEND and no_auth(auth):
            return await self._send_handling_redirects(request, follow_redirects=follow_redirects, history=history)
        return await super()._send_handling_auth(request, auth, follow_redirects, history)

    async def _send_single_request(self, request: httpx.Request) -> httpx.Response:
        if self._meshed(request):
            if _DIRECT_SEND:
                return await asend_to_mesh(self, request)
            return await super()._send_single_request(request)
        external = self._external_call(request)
        if external is None:
            return await super()._send_single_request(request)
        try:
            response: httpx.Response = await super()._send_single_request(external.request)
        except BaseException as exc:
            external.finish(None, exc)
            _own_request(exc, request)
            raise
        external.finish(response, None)
        response.request = request
        return response

    async def send(self, request: httpx.Request, *, stream: bool = False, **kwargs: Any) -> httpx.Response:
        if not stream:
            return _unbound(await super().send(request, **kwargs))
        token = streaming.set(True)
        try:
            return await super().send(request, stream=True, **kwargs)
        finally:
            streaming.reset(token)

    async def aclose(self) -> None:
        await super().aclose()
        await self._mesh_transport_aclose()

    async def __aexit__(self, *exc_info: Any) -> None:
        await super().__aexit__(*exc_info)
        await self._mesh_transport_aclose()

    async def _mesh_transport_aclose(self) -> None:
        transport = self._mesh_transport
        assert isinstance(transport, AsyncMeshTransport)
        await transport.aclose()
