"""httpx's and httpcore's exceptions for the HTTP client: which verdict each one is (the policy core's one
classifier, fed from here), and httpcore's exceptions as the httpx ones callers already catch."""

from __future__ import annotations

import httpcore
import httpx

from ..errors import DeadlineExceededError, MeshError
from ..policy.classify import CONNECT_FAILURE, CONNECT_TIMEOUT, LOCAL_ERROR, RESET, TIMEOUT, Verdict

_ERROR_KINDS: tuple[tuple[type[BaseException], Verdict], ...] = (
    # Order matters: the more specific classes come first.
    (httpcore.ConnectTimeout, CONNECT_TIMEOUT),
    (httpcore.ConnectError, CONNECT_FAILURE),
    (httpcore.PoolTimeout, CONNECT_TIMEOUT),
    (httpcore.ReadTimeout, TIMEOUT),
    (httpcore.WriteTimeout, TIMEOUT),
    (httpcore.ReadError, RESET),
    (httpcore.WriteError, RESET),
    (httpcore.RemoteProtocolError, RESET),
    (httpx.ConnectTimeout, CONNECT_TIMEOUT),
    (httpx.ConnectError, CONNECT_FAILURE),
    (httpx.PoolTimeout, CONNECT_TIMEOUT),
    (httpx.ReadTimeout, TIMEOUT),
    (httpx.WriteTimeout, TIMEOUT),
    (httpx.ReadError, RESET),
    (httpx.WriteError, RESET),
    (httpx.RemoteProtocolError, RESET),
    (ConnectionRefusedError, CONNECT_FAILURE),
    (ConnectionError, RESET),
    (TimeoutError, TIMEOUT),
)


def classify_error(exc: BaseException) -> Verdict:
    for cls, verdict in _ERROR_KINDS:
        if isinstance(exc, cls):
            return verdict
    return LOCAL_ERROR


_HTTPCORE_TO_HTTPX: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


def to_httpx_error(exc: BaseException) -> BaseException:
    """httpcore's exceptions as the httpx ones callers already catch; anything else unchanged."""
    for source, target in _HTTPCORE_TO_HTTPX:
        if isinstance(exc, source):
            mapped = target(str(exc))
            mapped.__cause__ = exc
            return mapped
    return exc


def httpx_class_of(exc: BaseException) -> type[httpx.TransportError] | None:
    """The httpx exception class a plain httpx client would have raised for ``exc`` (None: no such class)."""
    if isinstance(exc, httpx.TransportError):
        return type(exc)
    for source, target in _HTTPCORE_TO_HTTPX:
        if isinstance(exc, source):
            return target
    if isinstance(exc, ConnectionRefusedError):
        return httpx.ConnectError
    if isinstance(exc, TimeoutError):
        return httpx.TimeoutException
    if isinstance(exc, ConnectionError):
        return httpx.NetworkError
    return None


_BOTH: dict[tuple[type[MeshError], type[httpx.TransportError]], type[MeshError]] = {}


def _both(mesh_class: type[MeshError], httpx_class: type[httpx.TransportError]) -> type[MeshError]:
    """A mesh error class that is also ``httpx_class`` (``UnavailableError`` and ``httpx.ReadTimeout``), made once
    per pair (a handful exist: the mesh's error classes times httpx's transport errors)."""
    key = (mesh_class, httpx_class)
    made = _BOTH.get(key)
    if made is None:
        made = _BOTH[key] = type(
            mesh_class.__name__,
            (mesh_class, httpx_class),
            {"__module__": mesh_class.__module__, "__qualname__": mesh_class.__qualname__},
        )
    return made


def as_httpx_failure(error: MeshError, cause: BaseException | None) -> MeshError:
    """``error``, made also an instance of the httpx class of the failure that ended the call, so code written for
    httpx (``except httpx.ReadTimeout``, ``except httpx.ConnectError``) catches it: ``httpx.TimeoutException`` for a
    deadline, ``httpx.TransportError`` when no attempt failed in a way httpx names. ``.service``, ``.attempts``,
    ``.reason`` and ``.decisions`` are kept."""
    target = httpx_class_of(cause) if cause is not None else None
    if target is None or issubclass(target, MeshError):
        target = httpx.TimeoutException if isinstance(error, DeadlineExceededError) else httpx.TransportError
    if isinstance(error, target):
        return error
    try:
        both = _both(type(error), target)
    except TypeError:  # no consistent class order (cannot happen with httpx's tree; never fail the call for it)
        return error
    made = both(str(error), service=error.service, attempts=error.attempts, reason=error.reason)
    made.decisions = error.decisions
    return made
