"""The one classifier: every attempt's outcome becomes a Verdict that breaker, EWMA, retry and metrics all read.

Statuses are classified here; exceptions by each client shell, with its own table (``client/errors.py`` for
httpx and httpcore, ``grpc/status.py`` for gRPC codes), onto the verdicts below."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Kind(enum.Enum):
    SUCCESS = "success"  # 1xx-3xx
    CLIENT_ERROR = "client-error"  # 4xx: the server is healthy, the request was not
    SERVER_ERROR = "server-error"  # 5xx
    CONNECT_FAILURE = "connect-failure"  # never reached the server
    RESET = "reset"  # reached it (maybe), connection broke before a full response
    TIMEOUT = "timeout"  # per-try timeout
    LOCAL_ERROR = "local-error"  # our side's fault (bad request body, protocol misuse): never retried


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: Kind
    status: int | None
    #: The name ``retries.on`` uses for this outcome: ``"503"``, ``"connect-failure"``, ``"reset"``, ``"timeout"``.
    key: str
    #: Counts against the endpoint: breaker failure accrual and EWMA penalty.
    is_failure: bool
    #: The request may have been seen by the server (so only idempotent requests may repeat it).
    reached_server: bool
    #: The attempt ran out of the time it was given (a read or connect timeout): whether that is the endpoint's
    #: fault depends on how much time that was (``steps.blames_endpoint``).
    timed_out: bool = False

    @property
    def is_error(self) -> bool:
        """No HTTP response at all (the caller gets an exception if this is the last attempt)."""
        return self.status is None


def _status_verdict(status: int) -> Verdict:
    if status >= 500:
        kind = Kind.SERVER_ERROR
    elif status >= 400:
        kind = Kind.CLIENT_ERROR
    else:
        kind = Kind.SUCCESS
    return Verdict(kind, status, str(status), kind is Kind.SERVER_ERROR, True)


_STATUS_VERDICTS = {status: _status_verdict(status) for status in range(100, 600)}
CONNECT_FAILURE = Verdict(Kind.CONNECT_FAILURE, None, "connect-failure", True, False)
RESET = Verdict(Kind.RESET, None, "reset", True, True)
TIMEOUT = Verdict(Kind.TIMEOUT, None, "timeout", True, True, timed_out=True)
#: A connect (or connection pool) timeout: retried as a connect failure, blamed as a timeout.
CONNECT_TIMEOUT = Verdict(Kind.CONNECT_FAILURE, None, "connect-failure", True, False, timed_out=True)
LOCAL_ERROR = Verdict(Kind.LOCAL_ERROR, None, "local-error", False, False)


def classify_status(status: int) -> Verdict:
    verdict = _STATUS_VERDICTS.get(status)
    return verdict if verdict is not None else _status_verdict(status)
