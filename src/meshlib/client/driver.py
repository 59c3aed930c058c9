"""The one loop that carries a mesh call through its policy flow, written once for the sync and async shells.

``drive`` is a generator of effects: it asks its shell to run an attempt, pause, start a hedged attempt alongside,
wait for the next one to finish, settle the attempts still running, or drop a response, and it is sent back what
came of it. The shells only carry effects out (threads and ``time.sleep`` in one, tasks and ``await`` in the
other), so every decision between the flow's actions (when to drop the previous attempt's response, when an
answer replaces a fault, what is closed when the call fails, when telemetry ends) exists once. A shell's own
exception (cancellation) is thrown into the generator, so the call's end runs the same way.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, NamedTuple

import httpx

from ..errors import MeshError, NoEndpointsError
from ..policy.flow import HEDGE_DUE, Done, Result, Send, Sleep
from ..runtime import Runtime
from .call import HttpCall
from .errors import as_httpx_failure, to_httpx_error


class Attempt(NamedTuple):
    """Run one attempt now; send back ``(Result, response or None)``."""

    send: Send


class Pause(NamedTuple):
    """Sleep before the next attempt (backoff, an injected delay)."""

    seconds: float


class Alongside(NamedTuple):
    """Start a hedged attempt beside those in flight; send back nothing."""

    send: Send


class NextDone(NamedTuple):
    """Wait for the next attempt in flight to finish (at most ``timeout``); send back its Result, or None."""

    timeout: float | None


class Settle(NamedTuple):
    """The call is over: stop the attempts still in flight; send back the winner's response (or None)."""

    winner: int | None


class Drop(NamedTuple):
    """Close a response nobody will read (a replaced attempt's; ``read_small``: read a small one first, so that
    its connection stays reusable)."""

    response: httpx.Response
    read_small: bool


Effect = Attempt | Pause | Alongside | NextDone | Settle | Drop


def drive(call: HttpCall) -> Generator[Effect, Any, httpx.Response]:
    """Carry ``call`` through its flow; return its response, or raise the mesh's error for it."""
    flow = call.flow
    response: httpx.Response | None = None
    done: Done | None = None
    side_by_side = False
    try:
        action = next(flow)
        while True:
            kind = type(action)
            if kind is Send and not side_by_side and action.hedge_after is None:  # type: ignore[union-attr]
                if response is not None:
                    yield Drop(response, True)
                    response = None
                result: Result
                result, response = yield Attempt(action)  # type: ignore[arg-type]
                call.attempt_done(result)
                action = flow.send(result)
            elif kind is Sleep:
                yield Pause(action.seconds)  # type: ignore[union-attr]
                action = next(flow)
            else:  # hedged: a backup alongside, or wait for the attempts in flight
                side_by_side = True
                if kind is Send:
                    yield Alongside(action)  # type: ignore[arg-type]
                answered = yield NextDone(action.hedge_after)  # type: ignore[union-attr]
                action = flow.send(HEDGE_DUE if answered is None else answered)
    except StopIteration as stop:
        done = stop.value
    finally:
        flow.close()
        if side_by_side:
            response = yield Settle(done.winner if done is not None else None)
        if done is None or done.error is not None:
            if response is not None:
                yield Drop(response, False)
                response = None
        elif response is None:
            response = _fault_response(done)
        call.finish(done, response)
    assert done is not None
    if done.error is not None:
        _raise_done(done, call.mesh)
    assert response is not None
    return response


def _fault_response(done: Done) -> httpx.Response:
    assert done.abort_status is not None
    return httpx.Response(done.abort_status, headers={"x-mesh-fault": "abort"}, content=b"fault injected by mesh rules")


def _raise_done(done: Done, mesh: Runtime) -> None:
    error = done.error
    assert error is not None
    cause = done.result.error if done.result is not None else None
    if type(error) is NoEndpointsError and error.service and error.reason == NoEndpointsError.NONE_LISTED:
        error = NoEndpointsError(
            f"{error}; {mesh.explain_empty(error.service)}", service=error.service, reason=error.reason
        )
    if isinstance(error, MeshError):
        if done.decisions:
            error.decisions = tuple(done.decisions)
        error = as_httpx_failure(error, cause)
        raise error from cause
    raise to_httpx_error(error)
