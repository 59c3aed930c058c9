"""W3C trace context on outbound mesh requests.

Continues the active OpenTelemetry span's trace when there is one, else starts a new trace id, so every mesh
request carries a ``traceparent`` even in an uninstrumented application.
"""

from __future__ import annotations

import random

from opentelemetry import trace

_getrandbits = random.getrandbits


def outbound_traceparent() -> bytes:
    ctx = trace.get_current_span().get_span_context()
    span_id = _getrandbits(64) or 1
    if ctx.is_valid:
        return b"00-%032x-%016x-%02x" % (ctx.trace_id, span_id, ctx.trace_flags)
    return b"00-%032x-%016x-01" % (_getrandbits(128) or 1, span_id)
