"""Bounds on what one inbound connection can make a server hold, for uvicorn's httptools protocol (the control
plane and ``meshlib.serve`` both run on it):

- request headers larger than ``max_header_bytes`` get a 431 and the connection is closed (httptools itself has
  no limit: a 100 MB header would be read in full), counted up to the end of the head whatever the reads: a head
  that arrives in one write with its end inside it is counted header by header;
- a request whose headers are not complete ``header_timeout`` seconds after its first byte (or after the
  connection opened) is closed: a client that sends nothing, or a byte at a time, cannot hold a connection open;
- a request body must arrive at ``min_body_rate`` bytes a second on average once ``header_timeout`` has passed
  (time the application itself stops reading is not counted): 1 byte every 6 s of a 100 kB body cannot hold a
  connection, or a WSGI worker thread, for hours;
- at most ``MAX_PIPELINED`` requests may wait behind the one being answered: a client that pipelines megabytes of
  requests and never reads an answer is closed instead of queued (uvicorn queues every request of a read);
- at the connection cap, a new connection closes keep-alive connections that wait idle, so idle clients
  cannot hold every slot (a closed idle connection costs its client one reconnect); and one client address may
  keep at most ``MAX_IDLE_PER_CLIENT`` connections idle (past that, a connection going idle is closed).

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
#: Bytes a second a request body must average, after the first ``header_timeout`` seconds.
MIN_BODY_RATE = 1024.0
#: Requests that may wait, read but unanswered, behind the one in progress on a connection.
MAX_PIPELINED = 16
#: Idle keep-alive connections one client address may hold.
MAX_IDLE_PER_CLIENT = 256
#: Bytes a header line costs beyond its name and value (": " and CRLF), for counting a head from its parts.
_LINE_OVERHEAD = 4

_NOTHING = b""
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


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a connection the bounds refuse (uvicorn then calls
    ``send_400_response``, which sends our answer instead)."""


def bounded(
    protocol_class: type[Any],
    max_header_bytes: int = MAX_HEADER_BYTES,
    header_timeout: float = HEADER_TIMEOUT,
    refusals: RefusalLog = REFUSALS,
    min_body_rate: float = MIN_BODY_RATE,
    max_pipelined: int = MAX_PIPELINED,
    max_idle_per_client: int = MAX_IDLE_PER_CLIENT,
) -> type[Any]:
    """uvicorn's httptools protocol with the bounds above; any other protocol class is returned unchanged (h11
    has its own ``h11_max_incomplete_event_size``)."""
    if not hasattr(protocol_class, "on_headers_complete"):
        return protocol_class

    idle_by_client: Counter[str] = Counter()

    class BoundedProtocol(protocol_class):  # type: ignore[misc]
        _mesh_idle = False
        _mesh_in_headers = True
        _mesh_header_bytes = 0
        _mesh_head_bytes = 0
        _mesh_headers_ended = False
        _mesh_timer: asyncio.TimerHandle | None = None
        _mesh_refusal: bytes | None = None
        #: While a body is being read: when its rate was last measured from, and the bytes since.
        _mesh_body_since = 0.0
        _mesh_body_bytes = 0
        _mesh_in_body = False

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            limit = self.limit_concurrency
            if limit is not None and len(self.connections) >= limit:  # uvicorn answers 503 from this count on
                self._mesh_free_idle(len(self.connections) - limit + 1)
            self._mesh_arm(header_timeout)

        def _mesh_free_idle(self, count: int) -> None:
            """Close up to ``count`` connections waiting in keep-alive (no request in progress), to make room."""
            idle = [
                c
                for c in self.connections
                if c is not self and c.timeout_keep_alive_task is not None and not c.transport.is_closing()
            ]
            for conn in idle[:count]:
                refusals.refused("idle keep-alive connection closed at the connection cap", conn.client)
                conn.transport.close()
                self.connections.discard(conn)  # its slot is free now, not when the loop reports the close

        def _mesh_arm(self, delay: float) -> None:
            if self._mesh_timer is None:
                self._mesh_timer = asyncio.get_running_loop().call_later(delay, self._mesh_timed_out)

        def _mesh_disarm(self) -> None:
            if self._mesh_timer is not None:
                self._mesh_timer.cancel()
                self._mesh_timer = None

        def _mesh_timed_out(self) -> None:
            self._mesh_timer = None
            transport = self.transport
            if transport.is_closing():
                return
            if self._mesh_in_headers:
                refusals.refused(f"request headers not complete within {header_timeout:g}s", self.client)
                transport.close()
            elif self._mesh_in_body:
                self._mesh_check_body_rate()

        def _mesh_check_body_rate(self) -> None:
            now = time.monotonic()
            if self.flow.read_paused:  # the application is not reading: not the client's time
                self._mesh_body_since, self._mesh_body_bytes = now, 0
            elif self._mesh_body_bytes < min_body_rate * (now - self._mesh_body_since):
                refusals.refused(f"request body slower than {min_body_rate:g} bytes/s", self.client)
                self.transport.close()
                return
            else:  # measured again over the next stretch: a fast start cannot buy a stall
                self._mesh_body_since, self._mesh_body_bytes = now, 0
            self._mesh_arm(1.0)

        def send_400_response(self, msg: str) -> None:
            refusal = self._mesh_refusal
            if refusal is None:
                super().send_400_response(msg)
                return
            if refusal:
                self.transport.write(refusal)
            self.transport.close()

        def _mesh_refuse(self, reason: str, answer: bytes) -> None:
            refusals.refused(reason, self.client)
            self._mesh_refusal = answer
            self._mesh_in_headers = False
            self._mesh_disarm()
            raise _Refused(reason)

        def _mesh_set_idle(self, idle: bool) -> None:
            if idle == self._mesh_idle:
                return
            self._mesh_idle = idle
            who = self.client[0] if self.client else ""
            if idle:
                idle_by_client[who] += 1
                if idle_by_client[who] > max_idle_per_client:
                    refusals.refused(f"more than {max_idle_per_client} idle connections from one client", self.client)
                    self.transport.close()
            else:
                idle_by_client[who] -= 1
                if idle_by_client[who] <= 0:
                    del idle_by_client[who]

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.timeout_keep_alive_task is not None:  # waiting in keep-alive for the next request
                self._mesh_set_idle(True)

        def data_received(self, data: bytes) -> None:
            self._mesh_set_idle(False)
            self._mesh_headers_ended = False
            super().data_received(data)
            # count a chunk only when no request's headers or body ended inside it (so a body never counts: the
            # chunk that completes a body leaves us "in headers" for the next request); a head whose end is in
            # the chunk is counted by its parts instead (on_url, on_header)
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
            self._mesh_head_bytes = 0
            self._mesh_arm(header_timeout)

        def on_url(self, url: bytes) -> None:
            self._mesh_count_head(len(url) + 16)  # the method, the version and the line's spaces and CRLF
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._mesh_count_head(len(name) + len(value) + _LINE_OVERHEAD)
            super().on_header(name, value)

        def _mesh_count_head(self, size: int) -> None:
            self._mesh_head_bytes += size
            if self._mesh_head_bytes > max_header_bytes:
                self._mesh_refuse(f"request headers over {max_header_bytes} bytes", _431)

        def on_headers_complete(self) -> None:
            self._mesh_in_headers = False
            self._mesh_headers_ended = True
            self._mesh_header_bytes = 0
            self._mesh_disarm()
            super().on_headers_complete()
            if len(self.pipeline) > max_pipelined:
                self.pipeline.clear()
                self._mesh_refuse(f"more than {max_pipelined} pipelined requests waiting", _NOTHING)
            if self._mesh_has_body():
                self._mesh_in_body = True
                self._mesh_body_since, self._mesh_body_bytes = time.monotonic(), 0
                self._mesh_arm(header_timeout)

        def _mesh_has_body(self) -> bool:
            for name, value in self.headers:
                if name == b"transfer-encoding" or (name == b"content-length" and value.strip(b" 0")):
                    return True
            return False

        def on_body(self, body: bytes) -> None:
            self._mesh_body_bytes += len(body)
            super().on_body(body)

        def on_message_complete(self) -> None:
            super().on_message_complete()
            if self._mesh_in_body:
                self._mesh_in_body = False
                self._mesh_disarm()
            self._mesh_in_headers = True  # bytes from here on are the next request's headers
            self._mesh_headers_ended = True  # ...but not the rest of this chunk, which held the body's end
            self._mesh_header_bytes = 0

        def connection_lost(self, exc: Exception | None) -> None:
            self._mesh_disarm()
            self._mesh_set_idle(False)
            super().connection_lost(exc)

    BoundedProtocol.__name__ = f"Bounded{protocol_class.__name__}"
    return BoundedProtocol
