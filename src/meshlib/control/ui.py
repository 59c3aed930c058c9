"""The web dashboard: a single page (plain JS and SVG, shipped in the wheel, nothing fetched from elsewhere), the
rules diff it shows, and the CSRF guard for writes made from a browser.

The page is read-only without the admin token. A write from the page carries the token the user typed (kept in
the tab's session storage, never in the page) *and* this process's CSRF token from the page's ``<meta>``: a
browser that sends ``Origin`` or ``Sec-Fetch-Site`` must match our origin and show the CSRF token, so another site
cannot make a logged-in tab write. Tools (meshctl, curl, instances) send neither header and are unaffected."""

from __future__ import annotations

import asyncio
import difflib
import hmac
import json
import secrets
from importlib.resources import files
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .requests import BadQuery, error, int_param
from .store import UnknownVersion

if TYPE_CHECKING:
    from .app import ControlPlane

CSRF_HEADER = "x-mesh-csrf"
ASSETS = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
#: Everything from our own origin, nothing inline, no frames: the page renders data from instances (service
#: names, routes, tags), which must never become markup or script.
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


def _asset(name: str) -> bytes:
    return files("meshlib.control").joinpath("ui", name).read_bytes()


def rules_diff(old: Any, new: Any, a: int, b: int) -> str:
    """A unified diff of two rules documents, as sorted, indented JSON (stable whatever the key order)."""
    left = json.dumps(old, indent=2, sort_keys=True).splitlines()
    right = json.dumps(new, indent=2, sort_keys=True).splitlines()
    return "\n".join(difflib.unified_diff(left, right, f"version {a}", f"version {b}", lineterm=""))


class CsrfGuard:
    """ASGI middleware: writes from a browser must be same-origin and carry the page's CSRF token."""

    SAFE = frozenset(("GET", "HEAD", "OPTIONS"))

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in self.SAFE:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        origin = headers.get(b"origin")
        fetch_site = headers.get(b"sec-fetch-site")
        if origin is None and fetch_site is None:  # not a browser
            await self.app(scope, receive, send)
            return
        problem = None
        if fetch_site is not None and fetch_site not in (b"same-origin", b"none"):
            problem = "a cross-site write is refused"
        elif origin is not None and urlsplit(origin.decode("latin-1")).netloc.encode() != headers.get(b"host", b""):
            problem = "a write from another origin is refused"
        elif not hmac.compare_digest(headers.get(CSRF_HEADER.encode(), b""), self.token):
            problem = f"a write from a browser needs the page's {CSRF_HEADER} header: reload the dashboard"
        if problem is None:
            await self.app(scope, receive, send)
            return
        await error(403, problem, reason="csrf")(scope, receive, send)


def ui_routes(cp: ControlPlane) -> list[Route]:
    page = _asset("index.html").decode().replace("{{csrf}}", cp.csrf_token).encode()

    async def root(request: Request) -> Response:
        return RedirectResponse("/ui", status_code=307)

    async def index(request: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ASSETS:
            return error(404, f"no dashboard asset {name[:64]!r}")
        return Response(_asset(name), media_type=ASSETS[name], headers=SECURITY_HEADERS)

    async def diff(request: Request) -> Response:
        try:
            a = int_param(request, "from")
            b = int_param(request, "to")
        except BadQuery as exc:
            return error(400, str(exc))
        if a is None or b is None:
            return error(400, "query parameters from=<version> and to=<version> are required")
        try:
            old = (await asyncio.to_thread(cp.store.get, a)).document if a > 0 else {}
            new = (await asyncio.to_thread(cp.store.get, b)).document if b > 0 else {}
        except UnknownVersion as exc:
            return error(404, f"no rules version {exc}")
        return JSONResponse({"from": a, "to": b, "diff": rules_diff(old, new, a, b)})

    return [
        Route("/", root, methods=["GET"]),
        Route("/ui", index, methods=["GET"]),
        Route("/ui/{name}", asset, methods=["GET"]),
        Route("/v1/rules/diff", diff, methods=["GET"]),
    ]


def new_csrf_token() -> str:
    return secrets.token_urlsafe(24)
