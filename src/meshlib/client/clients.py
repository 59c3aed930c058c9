"""``meshlib.Client`` and ``meshlib.AsyncClient``: ``httpx.Client`` / ``httpx.AsyncClient`` whose requests to mesh
hosts go through the mesh transports."""

from __future__ import annotations

import functools
from typing import Any

import httpx

from ..mesh import Mesh
from .async_transport import AsyncMeshTransport
from .names import mesh_service_name
from .transport import _DEFAULT_LIMITS, MeshShell, MeshTransport


class _Cookies(httpx.Cookies):
    """httpx's cookie jar, without asking it about answers that set no cookie. httpx hands every response to
    ``http.cookiejar``, which builds a urllib request and an ``email.message`` for it whether or not it has
    ``Set-Cookie``: about a sixth of a mesh call's CPU at 64 calls in flight. The jar's contents are the same."""

    def extract_cookies(self, response: httpx.Response) -> None:
        headers = response.headers
        if "set-cookie" in headers or "set-cookie2" in headers:
            super().extract_cookies(response)


#: Parsed URLs by their string: ``httpx.URL`` is immutable, and parsing one costs about 8 us (a twentieth of a
#: mesh call's CPU). Bounded: a client calling endless distinct URLs keeps only the most recent.
_parsed_url = functools.lru_cache(maxsize=512)(httpx.URL)


class _MeshRouting:
    """What both clients add to httpx: mesh hosts always take the mesh transport (also under environment proxies),
    ``.mesh`` names the Mesh they go through, and the cookie jar skips answers without cookies."""

    _transport: Any
    _cookies: httpx.Cookies

    @property
    def cookies(self) -> httpx.Cookies:
        return self._cookies

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        self._cookies = _Cookies(cookies)

    @property
    def mesh(self) -> Mesh:
        """The Mesh this client's mesh calls go through (the process default one unless ``mesh=`` was given)."""
        transport = self._transport
        assert isinstance(transport, MeshShell)
        return transport.mesh

    def build_request(self, method: str, url: Any, **kwargs: Any) -> httpx.Request:
        if type(url) is str:  # a URL string seen before is not parsed again (aiohttp's yarl caches the same way)
            url = _parsed_url(url)
        return super().build_request(method, url, **kwargs)  # type: ignore[misc, no-any-return]

    def _transport_for_url(self, url: httpx.URL) -> Any:
        if mesh_service_name(url.host) is not None:
            return self._transport
        return super()._transport_for_url(url)  # type: ignore[misc]


def _connection_options(
    verify: Any, cert: Any, http1: bool, http2: bool, limits: httpx.Limits, trust_env: bool
) -> dict[str, Any]:
    """The options httpx uses for its own transports, given to the mesh transport and to httpx alike."""
    return {"verify": verify, "cert": cert, "http1": http1, "http2": http2, "limits": limits, "trust_env": trust_env}


class Client(_MeshRouting, httpx.Client):
    """An ``httpx.Client`` whose requests to mesh hosts (``http://payments/...``) go through the mesh.

    Everything httpx accepts keeps working. A ``transport=`` given here serves the non-mesh hosts; mesh hosts
    always take the mesh transport, also when environment proxies are configured.
    """

    def __init__(
        self,
        *,
        mesh: Mesh | None = None,
        transport: httpx.BaseTransport | None = None,
        verify: Any = True,
        cert: Any = None,
        http1: bool = True,
        http2: bool = False,
        limits: httpx.Limits = _DEFAULT_LIMITS,
        trust_env: bool = True,
        **kwargs: Any,
    ) -> None:
        options = _connection_options(verify, cert, http1, http2, limits, trust_env)
        if not isinstance(transport, MeshTransport):
            transport = MeshTransport(mesh, passthrough=transport, **options)
        super().__init__(transport=transport, **options, **kwargs)
        self.cookies = self._cookies


class AsyncClient(_MeshRouting, httpx.AsyncClient):
    """The ``httpx.AsyncClient`` drop-in; see ``Client``."""

    def __init__(
        self,
        *,
        mesh: Mesh | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: Any = True,
        cert: Any = None,
        http1: bool = True,
        http2: bool = False,
        limits: httpx.Limits = _DEFAULT_LIMITS,
        trust_env: bool = True,
        **kwargs: Any,
    ) -> None:
        options = _connection_options(verify, cert, http1, http2, limits, trust_env)
        if not isinstance(transport, AsyncMeshTransport):
            transport = AsyncMeshTransport(mesh, passthrough=transport, **options)
        super().__init__(transport=transport, **options, **kwargs)
        self.cookies = self._cookies
