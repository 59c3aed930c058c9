"""httpx's and httpcore's exceptions for the HTTP client: which verdict each one is (the policy core's one
classifier, fed from here), and httpcore's exceptions as the httpx ones callers already catch."""

from __future__ import annotations

import httpcore
import httpx

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
