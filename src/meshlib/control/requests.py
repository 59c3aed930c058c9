"""Reading untrusted requests on the control plane: bounded bodies, strict query parameters, JSON errors."""

from __future__ import annotations

import ipaddress
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from ..rules.checks import parse_duration
from .longpoll import MAX_WAIT

DEFAULT_WAIT = 30.0


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


class BadQuery(ValueError):
    pass


class TooLarge(Exception):
    pass


#: Registration and CSR bodies are small; anything larger is refused before it is read whole.
SMALL_BODY_BYTES = 64 * 1024
#: Largest integer accepted in a query parameter (versions, indexes): SQLite's integers are 64-bit.
MAX_QUERY_INT = 2**62


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or TooLarge as soon as it is known to exceed ``limit`` (by Content-Length, or while
    streaming): an oversized body is never held in memory whole."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or len(declared) > 18 or int(declared) > limit):
        raise TooLarge(declared)
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(str(size))
        parts.append(chunk)
    return b"".join(parts)


def too_large(limit: int) -> JSONResponse:
    """413, and the connection is closed after it: the rest of the body is never read."""
    response = error(413, f"request body is larger than the limit of {limit} bytes", limit=limit)
    response.headers["connection"] = "close"
    return response


def int_param(request: Request, name: str, default: int | None = None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if len(raw) > 19 or not raw.isdigit():
        raise BadQuery(f"query parameter {name}={raw[:40]!r} is not a non-negative integer")
    value = int(raw)
    if value > MAX_QUERY_INT:
        raise BadQuery(f"query parameter {name} must be at most {MAX_QUERY_INT}")
    return value


def wait_param(request: Request) -> float:
    raw = request.query_params.get("wait")
    if raw is None:
        return DEFAULT_WAIT
    try:
        return parse_duration(raw if raw[-1:].isalpha() else float(raw), maximum=MAX_WAIT)
    except ValueError as exc:
        raise BadQuery(f"query parameter wait={raw[:40]!r}: {exc}") from None
