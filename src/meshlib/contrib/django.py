"""Django: add ``"meshlib.contrib.django.MeshMiddleware"`` to ``MIDDLEWARE`` (first, so it sees every request).

The Mesh is the process default (``MESH_*`` environment); identity comes from the WSGI server (werkzeug's
``SSL_CLIENT_CERT`` or gunicorn's socket), or from the ASGI layer under ``meshlib.serve``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..inbound import Reply, handling, mesh_endpoint
from ..runtime import Runtime, process_default
from .wsgi import admit_environ, already_handled, note_route


def _response(reply: Reply) -> Any:
    from django.http import HttpResponse

    return HttpResponse(reply.body, status=reply.status, content_type=reply.content_type)


#: the hosts Django allows when DEBUG is on and ALLOWED_HOSTS is empty (django.http.request.HttpRequest.get_host)
_DEBUG_HOSTS = [".localhost", "127.0.0.1", "[::1]"]


def allow_mesh_host(service: str) -> None:
    """Mesh callers address a service by its name (``http://reports/summary`` sends ``Host: reports``), and Django
    answers 400 DisallowedHost to a host ``ALLOWED_HOSTS`` lacks: the service's own name joins the list. Nothing
    else is added, so a host that was refused before still is."""
    from django.conf import settings

    hosts = list(settings.ALLOWED_HOSTS)
    if "*" in hosts or service in hosts:
        return
    if not hosts and settings.DEBUG:
        hosts = list(_DEBUG_HOSTS)  # the list Django used in place of the empty one, which a non-empty one ends
    settings.ALLOWED_HOSTS = [*hosts, service]


class DjangoMeshMiddleware:
    mesh: Runtime | None = None  # tests and apps may set a Mesh explicitly

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response
        self._host_allowed = False

    def __call__(self, request: Any) -> Any:
        if not self._host_allowed:  # on the first request, when the process's Mesh (and its name) is settled
            allow_mesh_host((self.mesh or process_default()).service)
            self._host_allowed = True
        environ = request.META
        if already_handled(environ):  # the ASGI middleware records the request: it needs the route, though
            response = self.get_response(request)
            match = getattr(request, "resolver_match", None)
            route = str(getattr(match, "route", "") or "") if match is not None else ""
            if route:
                note_route(environ, _template(route))
            return response
        mesh = self.mesh or process_default()
        reply = mesh_endpoint(mesh, request.path_info)
        if reply is not None:
            return _response(reply)
        adm = admit_environ(mesh, environ)
        if adm.reply is not None:
            return _response(adm.reply)
        status = 500
        try:
            with handling(adm):
                response = self.get_response(request)
            status = response.status_code
            return response
        finally:
            match = getattr(request, "resolver_match", None)
            route = str(getattr(match, "route", "") or "") if match is not None else ""
            adm.finish(status, _template(route) if route else "")


def _template(route: str) -> str:
    """Django's route is ``items/<int:id>`` (no leading slash); the label is a path like every other framework's."""
    return route if route.startswith("/") else "/" + route


#: what ``MIDDLEWARE`` names: ``"meshlib.contrib.django.MeshMiddleware"``
MeshMiddleware = DjangoMeshMiddleware
