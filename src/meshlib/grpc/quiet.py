"""A quiet unary call: its first attempt made straight with the flow's own steps, with no call object.

Most unary calls are quiet: no metadata or call options of their own, no headers carried from a request being
handled, nothing tracing, no rules for the service, no hedging, nobody reading the decision log or the access
log. For such a call the whole of the mesh's work is the policy's (an endpoint picked, its load and breaker
updated, the retry budget credited) and one duration recorded; building the call object, the flow generator and
the driver around it cost twice that work again, on every call. So a quiet call takes the flow's steps itself
(``policy.flow.Attempts``: the same code the flow's loop runs) and, when its first attempt answers OK, ends
there. Anything else (a retryable failure, an error status, an interrupt) hands the call over, where it stands,
to the driver with a call object made then (``RpcCall.carrying_on``): the rest of the policy runs once, in the
one loop.
"""

from __future__ import annotations

from collections.abc import Callable
from logging import DEBUG
from time import monotonic
from typing import TYPE_CHECKING, Any

import grpc

from ..calls.recorder import deadline_header
from ..policy.decisions import logger as decision_logger
from ..policy.flow import Attempts, Done, Result, Send, Sleep
from ..policy.service import ServiceState
from ..propagation import outbound_deadline, propagated_headers
from ..runtime import Runtime
from ..telemetry.tracing import carried_traceparent
from .call import plain_metadata

if TYPE_CHECKING:
    from .facade import Facade


_OK = grpc.StatusCode.OK

#: How often a facade looks again at what tracing and logging say (see ``QuietGate``), in seconds.
RECHECK = 1.0


class QuietGate:
    """Whether this process's tracing and logging leave a call nothing to record beyond its duration: no tracer
    provider installed, the access log off, the decision log not at DEBUG. Looked at again at most every
    ``RECHECK`` seconds, as the tracer itself looks for a provider: three objects and two loggers read on every
    call were a sixth of a quiet call's cold cost. So turning the access log or DEBUG decision logging on while
    the process runs takes effect for quiet calls within a second (for every other call at once)."""

    __slots__ = ("open", "until")

    def __init__(self) -> None:
        self.open = False
        self.until = -1.0

    def look(self, mesh: Runtime, now: float) -> None:
        tel = mesh.telemetry
        self.open = not decision_logger.isEnabledFor(DEBUG) and (
            tel is None or not (tel.tracer.active() or tel.access.may_write())
        )
        self.until = now + RECHECK


def quiet_steps(facade: Facade[Any], state: ServiceState, timeout: float | None, replayable: bool) -> Attempts | None:
    """The steps of a quiet call, started (its clock read, its retry budget credited), or None when the call needs
    the call object from the start (see the module; the caller has checked its own metadata and options)."""
    if state.rules is not None or state.hedger is not None or propagated_headers.get():
        return None
    gate = facade.quiet_gate
    mesh = facade.mesh
    looked = monotonic()
    if looked >= gate.until:
        gate.look(mesh, looked)
    if not gate.open or carried_traceparent() is not None:
        return None
    now = state.last_used = mesh.clock()
    policy_timeout = state.policy.timeout
    if timeout is None or (policy_timeout is not None and policy_timeout < timeout):
        timeout = policy_timeout
    return Attempts(state, "POST", replayable, outbound_deadline(now, timeout), now, mesh.clock, mesh.rand, mesh.paused)


def quiet_metadata(mesh: Runtime, send: Send, shared: Callable[[Any], Any] | None = None) -> Any:
    """The attempt's metadata: the caller, the attempt number, and its deadline when it has one. With none, the
    shared tuple of ``plain_metadata``, or what ``shared`` makes of it (grpc.aio's own type, made once: see
    ``aio_unary._shared_aio_metadata``)."""
    attempt = send.attempt
    timeout = send.timeout
    if timeout is None and attempt < 16:
        made = plain_metadata(mesh.service)[attempt]
        return made if shared is None else shared(made)
    metadata: list[tuple[str, str | bytes]] = [("x-mesh-caller", mesh.service), ("x-mesh-attempt", str(attempt))]
    if timeout is not None:
        metadata.append(("x-mesh-deadline", deadline_header(mesh, timeout)))
    return metadata


def judged_quietly(facade: Facade[Any], steps: Attempts, result: Result, code: grpc.StatusCode) -> Sleep | Done | None:
    """The quiet call's first attempt judged (``code``: its status): None when that ends the call quietly (an OK
    answer, its duration recorded); otherwise where the driver takes the call on from (the ``Done`` that ends it,
    or the ``Sleep`` before a retry)."""
    then = steps.judge(result)
    if then is None and code is _OK:
        quiet_end(facade, steps.started)
        return None
    return then or steps.finished(result)


def quiet_end(facade: Facade[Any], started: float) -> None:
    """A quiet call answered OK at its first attempt: its duration is all there is to record."""
    counted = facade.quiet_success
    if counted is not None:
        histogram, labels = counted
        histogram.record(facade.mesh.clock() - started, labels)
