"""Consul-style blocking queries on asyncio: one Event per change, swapped on every change, so any number of
waiters cost one future each and no thread."""

from __future__ import annotations

import asyncio
import random

#: Consul adds up to wait/16 of jitter so that watchers which started together do not all return together.
JITTER_FRACTION = 1 / 16
MAX_WAIT = 600.0


class ChangeSignal:
    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.waiters = 0

    def fire(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait(self, timeout: float) -> bool:
        """Wait for the next change, at most ``timeout`` seconds; True if one came."""
        event = self._event
        self.waiters += 1
        try:
            await asyncio.wait_for(event.wait(), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self.waiters -= 1


def with_jitter(wait: float) -> float:
    wait = min(max(wait, 0.0), MAX_WAIT)
    return wait + random.random() * wait * JITTER_FRACTION
