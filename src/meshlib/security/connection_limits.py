"""Bounds on what one inbound connection can make a server hold, for uvicorn's httptools protocol (the control
plane and ``meshlib.serve`` both run on it):

- request headers larger than ``max_header_bytes`` get a 431 and the connection is closed (httptools itself has
  no limit: a 100 MB header would be read in full);
- a request whose headers are not complete ``header_timeout`` seconds after its first byte (or after the
  connection opened) is closed: a client that sends nothing, or a byte at a time, cannot hold a connection open.

Refusals are counted and logged at INFO, rate-limited (``RefusalLog``), so an attack is visible without flooding
the log.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from typing import Any

log = logging.getLogger("meshlib.security")

MAX_HEADER_BYTES = 64 * 1024
HEADER_TIMEOUT = 10.0

_431 = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: text/plain; charset=utf-8\r\ncontent-length: 32\r\nconnection: close\r\n\r\n"
    b"request headers are too large.\r\n"
)


class RefusalLog:
    """Counts refused connections by reason; logs at INFO at most once per ``interval`` per reason, with how many
    were refused since the last line."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.counts: Counter[str] = Counter()
        self._unlogged: Counter[str] = Counter()
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def refused(self, reason: str, peer: Any = None) -> None:
        now = time.monotonic()
        with self._lock:
            self.counts[reason] += 1
            self._unlogged[reason] += 1
            if now - self._last.get(reason, -1e9) < self.interval:
                return
            self._last[reason] = now
            count, self._unlogged[reason] = self._unlogged[reason], 0
        who = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "a peer"
        log.info("refused connection from %s: %s (%d refused for this reason since the last line)", who, reason, count)


REFUSALS = RefusalLog()


def bounded(
    protocol_class: type[Any],
    max_header_bytes: int = MAX_HEADER_BYTES,
    header_timeout: float = HEADER_TIMEOUT,
    refusals: RefusalLog = REFUSALS,
) -> type[Any]:
    """uvicorn's httptools protocol with the bounds above; any other protocol class is returned unchanged (h11
    has its own ``h11_max_incomplete_event_size``)."""
    if not hasattr(protocol_class, "on_headers_complete"):
        return protocol_class

    class BoundedProtocol(protocol_class):  # type: ignore[misc]
        _mesh_in_headers = True
        _mesh_header_bytes = 0
        _mesh_headers_ended = False
        _mesh_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self._mesh_arm()

        def _mesh_arm(self) -> None:
            if self._mesh_timer is None:
                self._mesh_timer = asyncio.get_running_loop().call_later(header_timeout, self._mesh_timed_out)

        def _mesh_disarm(self) -> None:
            if self._mesh_timer is not None:
                self._mesh_timer.cancel()
                self._mesh_timer = None

        def _mesh_timed_out(self) -> None:
            self._mesh_timer = None
            transport = self.transport
            if self._mesh_in_headers and not transport.is_closing():
                refusals.refused(f"request headers not complete within {header_timeout:g}s", self.client)
                transport.close()

        def data_received(self, data: bytes) -> None:
            self._mesh_headers_ended = False
            super().data_received(data)
            # count a chunk only when no request's headers or body ended inside it (so a body never counts: the
            # chunk that completes a body leaves us "in headers" for the next request)
            if self._mesh_in_headers and not self._mesh_headers_ended and self.parser is not None:
                self._mesh_header_bytes += len(data)
                if self._mesh_header_bytes > max_header_bytes and not self.transport.is_closing():
                    refusals.refused(f"request headers over {max_header_bytes} bytes", self.client)
                    self._mesh_in_headers = False
                    self._mesh_disarm()
                    self.transport.write(_431)
                    self.transport.close()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._mesh_in_headers = True
            self._mesh_arm()

        def on_headers_complete(self) -> None:
            self._mesh_in_headers = False
            self._mesh_headers_ended = True
            self._mesh_header_bytes = 0
            self._mesh_disarm()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._mesh_in_headers = True  # bytes from here on are the next request's headers
            self._mesh_headers_ended = True  # ...but not the rest of this chunk, which held the body's end
            self._mesh_header_bytes = 0

        def connection_lost(self, exc: Exception | None) -> None:
            self._mesh_disarm()
            super().connection_lost(exc)

    BoundedProtocol.__name__ = f"Bounded{protocol_class.__name__}"
    return BoundedProtocol
