"""The server half of the mesh for any WSGI app (the Flask glue uses it; Django has its own middleware).

Identity comes from the WSGI server: werkzeug's ``SSL_CLIENT_CERT``, or gunicorn's ``gunicorn.socket``. Under
``meshlib.serve`` (ASGI in front, through a2wsgi) the ASGI middleware has already done everything, so this one
steps aside.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..inbound import Admission, Reply, admit, handling, identity_from_environ, mesh_endpoint
from ..runtime import Runtime, process_default

StartResponse = Callable[..., Any]
_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def _start_reply(start_response: StartResponse, reply: Reply) -> list[bytes]:
    start_response(
        f"{reply.status} {_REASONS.get(reply.status, 'Error')}",
        [("Content-Type", reply.content_type), ("Content-Length", str(len(reply.body)))],
    )
    return [reply.body]


def already_handled(environ: dict[str, Any]) -> bool:
    scope = environ.get("asgi.scope")
    return bool(scope and scope.get("meshlib.inbound"))


def note_route(environ: dict[str, Any], route: str) -> None:
    """Record the framework's route template for the request's metrics and span: in the environ for the WSGI glue,
    and in the ASGI scope when a2wsgi runs the app under the ASGI middleware (``meshlib.serve``, ``meshctl run``),
    which then does the recording and would otherwise see no route."""
    environ["meshlib.route"] = route
    scope = environ.get("asgi.scope")
    if isinstance(scope, dict):
        scope["meshlib.route"] = route


def admit_environ(mesh: Runtime, environ: dict[str, Any]) -> Admission:
    def header(name: str) -> str | None:
        value = environ.get("HTTP_" + name.upper().replace("-", "_"))
        return str(value) if value is not None else None

    carrier = {k: v for k in ("traceparent", "tracestate") if (v := header(k)) is not None}
    return admit(
        mesh,
        environ.get("REQUEST_METHOD", "GET"),
        environ.get("PATH_INFO", "/"),
        header,
        identity_from_environ(environ),
        carrier,
    )


class _Finishing:
    """Wraps the app's response iterable so metrics and the span end when the server closes it."""

    def __init__(self, body: Iterable[bytes], finish: Callable[[], None]) -> None:
        self._body = body
        self._finish = finish

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._finish()


class MeshWSGIMiddleware:
    def __init__(self, app: Callable[..., Iterable[bytes]], mesh: Runtime | None = None) -> None:
        self.app = app
        self._mesh = mesh

    @property
    def mesh(self) -> Runtime:
        if self._mesh is None:
            self._mesh = process_default()
        return self._mesh

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if already_handled(environ):
            return self.app(environ, start_response)
        mesh = self.mesh
        reply = mesh_endpoint(mesh, environ.get("PATH_INFO", "/"))
        if reply is not None:
            return _start_reply(start_response, reply)
        adm = admit_environ(mesh, environ)
        if adm.reply is not None:
            return _start_reply(start_response, adm.reply)
        status = [500]

        def recording_start_response(status_line: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            status[0] = int(status_line.split(" ", 1)[0])
            return start_response(status_line, headers, exc_info)

        try:
            with handling(adm):
                body = self.app(environ, recording_start_response)
        except BaseException:
            adm.finish(500, str(environ.get("meshlib.route", "")))
            raise
        return _Finishing(body, lambda: adm.finish(status[0], str(environ.get("meshlib.route", ""))))
