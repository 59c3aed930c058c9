"""What the request being handled passes on to the calls made while handling it: its deadline and its routing
headers. Context variables carry them, so asyncio tasks and ``asyncio.to_thread`` / ``contextvars.copy_context``
threads started by the handler inherit them.

Routing headers across hops (``MESH_PROPAGATE_HEADERS=x-canary,x-user-id``): the inbound side keeps the listed
headers of the request being handled, and mesh calls made while handling it send them on (unless the call sets them
itself), so a canary or A/B decision taken at the edge holds all the way down. Istio leaves this to the
application; here it is a setting."""

from __future__ import annotations

import contextvars
import time

from .policy.deadline import call_deadline

#: The deadline of the inbound request being served, as Unix epoch seconds. Set by the server side; every mesh
#: call made inside the handler caps its timeout to what is left.
incoming_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "meshlib_incoming_deadline", default=None
)

#: (lower-case name, value) pairs of the request being handled.
propagated_headers: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar(
    "meshlib_propagated_headers", default=()
)


def outbound_deadline(now: float, timeout: float | None) -> float | None:
    """A new call's monotonic deadline: its ``timeout`` from ``now``, capped by the deadline of the request being
    handled (if any)."""
    incoming = incoming_deadline.get()
    if incoming is None:
        return None if timeout is None else now + timeout
    return call_deadline(now, timeout, time.time(), incoming)
