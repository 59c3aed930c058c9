"""Untrusted text in log lines: escaped (a ``%0A`` in a path cannot write a forged line) and shortened, and lines
an attacker can trigger at will rate-limited (with a count of what was left out)."""

from __future__ import annotations

import threading
import time


def printable(text: str, limit: int = 200) -> str:
    """``text`` with control and non-ASCII characters escaped (``\\n``, ``\\x1b``, ``\\u2028``) and cut to ``limit``
    characters, marked when cut."""
    cut = len(text) > limit
    head = text[:limit]
    if not (head.isascii() and head.isprintable()):
        head = head.encode("unicode_escape").decode("ascii")
    return head + "..." if cut else head


class Throttle:
    """At most one line per ``interval`` seconds for each key; ``allow`` says how many were held back since."""

    def __init__(self, interval: float = 1.0, max_keys: int = 1024) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> int | None:
        """None: stay quiet; else log now, and this many lines were held back since the last one."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._held[key] = self._held.get(key, 0) + 1
                return None
            if last is None and len(self._last) >= self.max_keys:  # many keys: forget the oldest half
                for old in sorted(self._last, key=self._last.__getitem__)[: self.max_keys // 2]:
                    self._last.pop(old, None)
                    self._held.pop(old, None)
            self._last[key] = now
            return self._held.pop(key, 0)
