"""gRPC outcomes for the one classifier, and mesh errors as ``grpc.RpcError``.

Every attempt's status code becomes a ``Verdict`` the policy core already understands, as HTTP statuses do.
Following gRPC's retry design, only ``UNAVAILABLE`` is safe to repeat (the server did not process the call), so
it alone is marked as not having reached the server; every other status may have run the handler. ``UNAVAILABLE``,
``RESOURCE_EXHAUSTED`` and ``DEADLINE_EXCEEDED`` count against the endpoint (breaker, load estimate); application
statuses (``NOT_FOUND``, ``INVALID_ARGUMENT``, ``INTERNAL``...) are the application's business and do not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from ..errors import CircuitOpenError, DeadlineExceededError, MeshError, RetryBudgetExhaustedError
from ..policy.classify import Kind, Verdict
from ..policy.steps import Result

#: The HTTP status each code maps to (gRPC's own HTTP mapping), for metrics' status class and span attributes.
HTTP_EQUIVALENT: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}
#: ``retries.on`` names this outcome ``unavailable``; it is in the default list.
_FAILURES = {
    grpc.StatusCode.UNAVAILABLE: Verdict(Kind.SERVER_ERROR, 503, "unavailable", True, False),
    grpc.StatusCode.RESOURCE_EXHAUSTED: Verdict(Kind.SERVER_ERROR, 429, "resource-exhausted", True, True),
    grpc.StatusCode.DEADLINE_EXCEEDED: Verdict(Kind.TIMEOUT, 504, "deadline-exceeded", True, True, timed_out=True),
}


def _verdict(code: grpc.StatusCode) -> Verdict:
    failure = _FAILURES.get(code)
    if failure is not None:
        return failure
    kind = Kind.SUCCESS if code is grpc.StatusCode.OK else Kind.CLIENT_ERROR
    return Verdict(kind, HTTP_EQUIVALENT.get(code, 500), code.name.lower(), False, True)


VERDICTS: dict[grpc.StatusCode, Verdict] = {code: _verdict(code) for code in grpc.StatusCode}
OK = VERDICTS[grpc.StatusCode.OK]
UNKNOWN = VERDICTS[grpc.StatusCode.UNKNOWN]


def number_of(code: grpc.StatusCode) -> int:
    """The code's number (``UNAVAILABLE``: 14), read without the enum's Python-level properties and hash (this runs
    on every call)."""
    number: int = code._value_[0]
    return number


#: The verdicts and HTTP equivalents by code number, for the per-call path (see ``number_of``).
VERDICTS_BY_NUMBER = tuple(VERDICTS[code] for code in sorted(grpc.StatusCode, key=number_of))
HTTP_BY_NUMBER = tuple(HTTP_EQUIVALENT[code] for code in sorted(grpc.StatusCode, key=number_of))
assert [number_of(code) for code in sorted(grpc.StatusCode, key=number_of)] == list(range(len(VERDICTS)))


def verdict_of(code: grpc.StatusCode | None) -> Verdict:
    """The verdict of a finished attempt (a missing code, as from a broken call object, is UNKNOWN)."""
    return VERDICTS_BY_NUMBER[code._value_[0]] if code is not None else UNKNOWN


#: A gRPC attempt's ``Result`` never carries an exception (its error is in its answer): one shared ``Result`` per
#: code and attempt number (1-15), made once instead of on every attempt. Results are never changed once made.
_RESULTS = tuple(tuple(Result(verdict, None, attempt) for attempt in range(16)) for verdict in VERDICTS_BY_NUMBER)


def result_of(code: grpc.StatusCode | None, attempt: int) -> Result:
    """The flow's ``Result`` for an attempt that ended with ``code`` (None: UNKNOWN)."""
    if attempt < 16:
        return _RESULTS[code._value_[0] if code is not None else 2][attempt]
    return Result(verdict_of(code), None, attempt)


def code_of_http(status: int) -> grpc.StatusCode:
    """For fault injection's ``abort.status`` (an HTTP status in the rules): the code gRPC maps it from."""
    if status in (502, 503, 504):
        return grpc.StatusCode.UNAVAILABLE
    return {
        400: grpc.StatusCode.INTERNAL,
        401: grpc.StatusCode.UNAUTHENTICATED,
        403: grpc.StatusCode.PERMISSION_DENIED,
        404: grpc.StatusCode.UNIMPLEMENTED,
        429: grpc.StatusCode.UNAVAILABLE,
    }.get(status, grpc.StatusCode.UNKNOWN)


class MeshRpcError(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """A call the mesh ended itself (no endpoint, open breaker, deadline, budget) or one whose every attempt
    failed: a ``grpc.RpcError`` with a fitting status code and details that name the service and each endpoint
    tried, so existing ``except grpc.RpcError`` clauses and ``e.code()`` checks keep working. The mesh's own
    exception, when there is one, is ``mesh_error`` (and ``__cause__``)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        mesh_error: BaseException | None = None,
        trailing: Sequence[tuple[str, str | bytes]] = (),
        initial: Sequence[tuple[str, str | bytes]] = (),
    ) -> None:
        super().__init__(details)
        self._code = code
        self._details = details
        self.mesh_error = mesh_error
        self._trailing = tuple(trailing)
        self._initial = tuple(initial)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._trailing

    def initial_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._initial

    def debug_error_string(self) -> str:
        return self._details

    # grpc.RpcContext / grpc.Call: a finished call
    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False

    def __str__(self) -> str:
        return f"<MeshRpcError {self._code.name}: {self._details}>"


class FailedStream(MeshRpcError, grpc.Future):  # type: ignore[misc]
    """A streaming call the mesh ended before it started (no endpoint, a deadline already past, a fault abort),
    as grpc returns one: a call object that is also an iterator and a future, and raises itself when read, not
    from the stub call."""

    @classmethod
    def of(cls, error: grpc.RpcError) -> FailedStream:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        made = cls(code, details, getattr(error, "mesh_error", None))
        made.__cause__ = error.__cause__ or error
        return made

    def __iter__(self) -> FailedStream:
        return self

    def __next__(self) -> Any:
        raise self

    def cancelled(self) -> bool:
        return False

    def running(self) -> bool:
        return False

    def done(self) -> bool:
        return True

    def result(self, timeout: float | None = None) -> Any:
        raise self

    def exception(self, timeout: float | None = None) -> BaseException:
        return self

    def traceback(self, timeout: float | None = None) -> Any:
        return None

    def add_done_callback(self, fn: Any) -> None:
        fn(self)


def from_mesh_error(error: BaseException) -> MeshRpcError:
    """A mesh verdict as the status a gRPC caller expects: deadline → DEADLINE_EXCEEDED, everything that means
    "no instance could take it" (no endpoints, open breakers, budget, all attempts failed) → UNAVAILABLE."""
    if isinstance(error, DeadlineExceededError):
        code = grpc.StatusCode.DEADLINE_EXCEEDED
    elif isinstance(error, RetryBudgetExhaustedError | CircuitOpenError | MeshError):
        code = grpc.StatusCode.UNAVAILABLE
    else:
        code = grpc.StatusCode.INTERNAL
    wrapped = MeshRpcError(code, str(error), error)
    wrapped.__cause__ = error
    return wrapped


def with_attempts(error: grpc.RpcError, service: str, attempts: list[str]) -> grpc.RpcError:
    """The last attempt's failure, with details naming the service and every endpoint tried; the code, trailing
    metadata and the original error (as ``__cause__``) are kept."""
    # sync errors are grpc.Call objects; grpc.aio's AioRpcError has the same methods without the base class
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    original = error.details() if hasattr(error, "details") else str(error)
    trailing = (error.trailing_metadata() or ()) if hasattr(error, "trailing_metadata") else ()
    details = f"{service}: {len(attempts)} attempt(s) failed: {'; '.join(attempts)}"
    if original:
        details += f" (last: {original})"
    wrapped = MeshRpcError(code, details, None, trailing)
    wrapped.__cause__ = error
    return wrapped
