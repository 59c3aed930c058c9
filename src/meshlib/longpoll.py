"""A blocking-query loop in a background thread, following Consul's rules for its clients:

- an index that goes backwards resets to 0, and an index below 1 becomes 1 (after the first answer);
- an answer is not proof of change: the handler compares snapshots itself;
- the loop is rate-limited, so a server that answers at once cannot make it spin;
- errors back off exponentially with jitter, up to ``max_backoff``; an answer its handler refuses (invalid data)
  is an error too, and nothing raised by a handler or an error handler ends the loop.

Used for the rules watcher, the embedded registry's watches and Consul's.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from .randomness import uniform

log = logging.getLogger("meshlib.longpoll")

#: ``fetch(index) -> (new_index, payload)``; raises on any failure.
Fetch = Callable[[int], tuple[int, Any]]


class LongPoller:
    def __init__(
        self,
        name: str,
        fetch: Fetch,
        on_answer: Callable[[int, Any], None],
        *,
        on_error: Callable[[BaseException], None] | None = None,
        min_interval: float = 0.05,
        base_backoff: float = 0.2,
        max_backoff: float = 30.0,
    ) -> None:
        self.name = name
        self._fetch = fetch
        self._on_answer = on_answer
        self._on_error = on_error
        self.min_interval = min_interval
        self.base_backoff = base_backoff
        self.max_backoff = max_backoff
        self.index = 0
        self.requests = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"meshlib-{name}", daemon=True)

    def start(self) -> LongPoller:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self.requests += 1
            try:
                new_index, payload = self._fetch(self.index)
                if new_index < self.index:
                    new_index = 0  # the server's index went backwards (restart, snapshot restore): start over
                self._on_answer(new_index, payload)
            except Exception as exc:  # the loop must outlive anything a server (or a handler) throws at it
                if self._stop.is_set():
                    return
                failures += 1
                self.errors += 1
                delay = min(self.max_backoff, self.base_backoff * 2 ** min(failures - 1, 16))
                delay = delay / 2 + uniform() * delay / 2
                level = logging.WARNING if failures in (1, 5) or failures % 50 == 0 else logging.DEBUG
                log.log(level, "%s: %s (attempt %d; retrying in %.1fs)", self.name, exc, failures, delay)
                if self._on_error is not None:
                    try:
                        self._on_error(exc)
                    except Exception:
                        log.exception("%s: handling a failure failed", self.name)
                self._stop.wait(delay)
                continue
            failures = 0
            self.index = max(new_index, 1)
            self._stop.wait(self.min_interval)
