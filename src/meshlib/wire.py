"""Reading JSON answers from mesh peers (control plane, registry) with bounds: an answer is untrusted input."""

from __future__ import annotations

import json
import ssl
from typing import Any

import httpx

#: The per-instance secret the registry hands out at registration; heartbeat, overwrite and deregister need it.
SECRET_HEADER = "x-mesh-instance-secret"
#: Largest JSON answer read from a control plane or registry (a rules document is at most 1 MiB).
MAX_ANSWER_BYTES = 4 << 20


class BadAnswer(ValueError):
    """The answer is too large or not JSON; the message says which, and where it came from."""


def bounded_json(response: httpx.Response, limit: int = MAX_ANSWER_BYTES) -> Any:
    content = response.content
    if len(content) > limit:
        raise BadAnswer(f"{response.request.url}: answer of {len(content)} bytes is over the limit of {limit}")
    try:
        return json.loads(content)
    except (ValueError, RecursionError) as exc:
        raise BadAnswer(f"{response.request.url}: invalid JSON ({exc})") from None


#: What to do when a control plane's certificate does not verify: retrying cannot help, the CA file must change.
UNTRUSTED_HINT = (
    "its certificate is not signed by the CA in MESH_CONTROL_PLANE_CA (or, unset, by a system root): check "
    "MESH_CONTROL_PLANE_CA; meshctl serve --tls writes the mesh's CA as ca-roots.pem in its state directory"
)


def untrusted(exc: BaseException) -> bool:
    """Whether a transport error is a certificate that did not verify (httpx keeps ssl's error as the cause)."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def error_text(exc: BaseException, watches: int = 0) -> str:
    """An error as a reader-facing line, never empty (httpx's timeouts often carry no message)."""
    if isinstance(exc, httpx.PoolTimeout):
        return f"discovery connection pool exhausted with {watches} watches (PoolTimeout)"
    if untrusted(exc):
        return f"cannot verify it: {UNTRUSTED_HINT}"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def refusal_text(response: httpx.Response) -> str:
    """A control plane's refusal as one line: its own ``error`` message (which names the variable to set), not
    httpx's status text with a link."""
    try:
        body = response.json()
        message = body.get("error") if isinstance(body, dict) else None
    except ValueError:
        message = None
    return str(message or response.text.strip()[:200] or response.reason_phrase)
