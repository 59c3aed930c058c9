"""Deadlines: a call's absolute deadline from its own timeout and the incoming request's ``x-mesh-deadline``.

Internally on the monotonic clock; converted to Unix epoch milliseconds only at the wire. Pure: both clocks'
readings and the incoming deadline are passed in (``meshlib.propagation`` reads them for the shells).
"""

from __future__ import annotations

#: The furthest an incoming deadline may lie ahead; a later one is capped to this (a caller cannot make a server
#: hold work, or pass a deadline downstream, for days).
MAX_INCOMING_DEADLINE = 3600.0


def parse_deadline_header(value: str | bytes, wall_now: float) -> float:
    """``x-mesh-deadline`` (epoch milliseconds) to epoch seconds, capped at ``MAX_INCOMING_DEADLINE`` from now;
    ValueError naming the header when malformed."""
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    if not isinstance(text, str) or not text.isascii() or not text.isdigit() or len(text) > 15:
        shown = text[:32] if isinstance(text, str) else text
        raise ValueError(f"malformed x-mesh-deadline header {shown!r}: expected Unix epoch milliseconds")
    millis = int(text)
    if millis <= 0:
        raise ValueError(f"malformed x-mesh-deadline header {text!r}: must be positive")
    return min(millis / 1000.0, wall_now + MAX_INCOMING_DEADLINE)


def call_deadline(now: float, timeout: float | None, wall_now: float, incoming: float | None) -> float | None:
    """Absolute monotonic deadline for a call: the earlier of ``now + timeout`` and the incoming wall-clock
    deadline (epoch seconds, translated onto the monotonic clock)."""
    deadline = None if timeout is None else now + timeout
    if incoming is not None:
        inherited = now + (incoming - wall_now)
        if deadline is None or inherited < deadline:
            deadline = inherited
    return deadline


def to_epoch_millis(deadline: float, now: float, wall_now: float) -> int:
    return int((wall_now + (deadline - now)) * 1000)
