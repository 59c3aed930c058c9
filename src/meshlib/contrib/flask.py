"""Flask: ``meshlib.contrib.flask.Mesh(app)`` — one line.

Identity, authorization, deadline and trace context for every request (see ``meshlib.inbound``), ``/-/mesh/health``
and ``/-/mesh/metrics``, server metrics by route template, access log. ``peer()`` in a view gives the caller's
verified SPIFFE ID.
"""

from __future__ import annotations

from typing import Any

from ..inbound import peer_identity
from ..runtime import Runtime
from ..security.spiffe import SpiffeId
from .wsgi import MeshWSGIMiddleware, note_route


class FlaskMesh:
    def __init__(self, app: Any = None, mesh: Runtime | None = None) -> None:
        self.mesh = mesh
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Any) -> None:
        from flask import request

        app.wsgi_app = MeshWSGIMiddleware(app.wsgi_app, self.mesh)

        def _mesh_route() -> None:  # the route template, not the raw path: bounded metric labels
            if request.url_rule is not None:
                note_route(request.environ, request.url_rule.rule)

        app.before_request(_mesh_route)
        app.extensions["meshlib"] = self


def peer() -> SpiffeId | None:
    """The verified identity of the caller of the current request (None: plaintext or not a mesh identity)."""
    return peer_identity.get()


#: the documented one-liner: ``meshlib.contrib.flask.Mesh(app)``
Mesh = FlaskMesh
