"""The exception hierarchy: protocol-neutral, as the policy core that raises it.

The shells turn these into what their caller's library raises, at their boundary: an HTTP call's mesh error is
also an instance of the httpx class of the failure that ended it (``httpx.ConnectError``, ``httpx.ReadTimeout``;
``httpx.TimeoutException`` for a deadline; ``httpx.TransportError`` otherwise: ``client/errors.py``), and a gRPC
call's is a ``grpc.RpcError`` with its status code (``grpc/status.py``). A rules typo or a bad setting is a
``ConfigurationError`` (a ``ValueError``), never a transport error.
"""

from __future__ import annotations

from collections.abc import Sequence


class MeshError(Exception):
    """Base of every error meshlib raises."""

    def __init__(
        self, message: str, *, service: str | None = None, attempts: Sequence[str] = (), reason: str = ""
    ) -> None:
        super().__init__(message)
        self.service = service
        #: One human-readable line per attempt: ``"127.0.0.1:8001 connect-failure (ConnectError: ...)"``.
        self.attempts = tuple(attempts)
        #: Why, as a stable token code can branch on (each class documents its own), never the message text.
        self.reason = reason
        #: The call's decision log (``meshlib.policy.decisions.Decision``, one per attempt), when there was a call.
        self.decisions: tuple[object, ...] = ()


class ConfigurationError(MeshError, ValueError):
    """A setting, rule or argument is malformed; the message names the setting and the problem."""


class RegistrationRefused(ConfigurationError):
    """The registry refused this instance's registration for good (401/403: a missing or wrong token): retrying
    cannot help, the message says what to set."""


class IdentityError(MeshError):
    """No certificate could be obtained or loaded; the message says why."""


class NoEndpointsError(MeshError):
    """The service is unknown to discovery, or it has no healthy instance. ``reason`` says which."""

    #: Discovery has never answered for this name.
    UNKNOWN_SERVICE = "unknown-service"
    #: Discovery answers, and lists no usable instance.
    NONE_LISTED = "none-listed"
    #: Discovery lists instances, and every one was skipped for its mTLS mode (the message says what to set).
    ALL_SKIPPED = "all-skipped"
    #: The rules chose a subset that selects no instance.
    SUBSET_EMPTY = "subset-empty"
    #: Discovery did not answer in time (its last error is in the message).
    NO_ANSWER = "no-discovery-answer"


class CircuitOpenError(MeshError):
    """Every instance of the service is ejected by its circuit breaker: failing fast instead of calling."""


class DeadlineExceededError(MeshError):
    """The call's deadline (its own timeout, or the one inherited from an incoming request) has passed."""


class RetryBudgetExhaustedError(MeshError):
    """An attempt failed and a retry was warranted, but the service's retry budget is spent."""


class UnavailableError(MeshError):
    """Every attempt failed without a response (connect failures, resets, per-try timeouts)."""


def describe_attempts(service: str, attempts: Sequence[str]) -> str:
    if not attempts:
        return service
    return f"{service}: tried {len(attempts)}x: " + "; ".join(attempts)
