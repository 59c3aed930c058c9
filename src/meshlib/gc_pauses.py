"""How long this process has stood still in garbage collection, so the balancer does not blame an endpoint for it.

A collection of the oldest generation in a large heap holds the GIL for tens to hundreds of milliseconds. An attempt
in flight across it is measured that much slower, though its answer was waiting in the socket all along, and
peak-EWMA keeps a slow sample for tens of seconds (a 130 ms pause against 1 ms answers takes about 50 s to decay
away at the 10 s time constant). Each pause would push traffic off whichever instances happened to be in flight,
onto the others; a busy service that collects every few seconds would skew its load for good. The call flow takes
the pauses during an attempt out of the latency it records.

One case comes out the other way: a thread blocked in a socket read is not stopped by another thread's collection,
so if its answer came after the pause, it is recorded as faster than it was, by at most the pause. That error is
short-lived (peak-EWMA takes the next slower sample at once); the one it replaces lasted a minute.

It lives outside ``policy/``, which reads no clock: the call flow is handed the meter as it is handed the clock.
The meter is a ``gc.callbacks`` hook: two calls of a small function per collection, and nothing per request.
Collections never overlap (the GIL), so two module globals are the whole state.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

from .policy.steps import no_pauses

_clock = time.monotonic
_started = 0.0
_total = 0.0


def _on_collection(phase: str, info: dict[str, Any]) -> None:
    global _started, _total
    if phase == "start":
        _started = _clock()
    else:
        _total += _clock() - _started


def gc_paused() -> float:
    """Seconds this process has spent in garbage collection since the meter was installed."""
    return _total


def meter_for(clock: Callable[[], float]) -> Callable[[], float]:
    """The pause meter that goes with ``clock``: the real one (installed once per process) for ``time.monotonic``,
    none for any other clock (a test's fake clock has no garbage collection in it)."""
    if clock is not time.monotonic:
        return no_pauses
    if _on_collection not in gc.callbacks:
        gc.callbacks.append(_on_collection)
    return gc_paused
