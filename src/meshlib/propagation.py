"""Routing headers across hops (``MESH_PROPAGATE_HEADERS=x-canary,x-user-id``): the inbound side keeps the listed
headers of the request being handled, and mesh calls made while handling it send them on (unless the call sets them
itself), so a canary or A/B decision taken at the edge holds all the way down. Istio leaves this to the
application; here it is a setting. Context variables carry them, so asyncio tasks and ``asyncio.to_thread`` /
``contextvars.copy_context`` threads started by the handler inherit them."""

from __future__ import annotations

import contextvars

#: (lower-case name, value) pairs of the request being handled.
propagated_headers: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar(
    "meshlib_propagated_headers", default=()
)
