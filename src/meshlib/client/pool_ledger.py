"""One endpoint's keep-alive connections, as decisions with no I/O and no lock: the idle stack, the cap, the callers
waiting at the cap, the closed flag. Both engines' pools (``pools.py`` with a lock and thread events,
``async_pools.py`` with anyio events, so trio works) ask it what to do and carry it out themselves: reuse this
connection, open one, wait; hand a returned connection to a waiter, keep it idle, or drop it.

meshlib has already chosen the endpoint when it sends, so it needs no general pool matching queued requests to
origins: a checkout pops the most recently used idle connection (O(1); only that one is checked for expiry), a
release hands the connection straight to the longest-waiting caller or pushes it back.
"""

from __future__ import annotations

import collections
import contextlib
import ssl
import time
from typing import Any, Generic, Protocol, TypeVar

IDLE, ACTIVE, CLOSED = 0, 1, 2


class Pooled(Protocol):
    def has_expired(self) -> bool: ...
    def is_idle(self) -> bool: ...
    def is_closed(self) -> bool: ...


C = TypeVar("C", bound=Pooled)


class KeepAlive:
    """What both engines' connections share: their endpoint, and the keep-alive state their stacks read."""

    __slots__ = ("_host", "_idle_since", "_keepalive", "_port", "_ssl", "_state", "_used")

    def __init__(
        self, scheme: bytes, host: str, port: int, ssl_context: ssl.SSLContext | None, keepalive: float | None
    ) -> None:
        self._host = host
        self._port = port
        self._ssl = ssl_context if scheme == b"https" else None
        self._keepalive = keepalive
        self._state = IDLE
        self._idle_since = 0.0
        self._used = False

    def _idle_too_long(self) -> bool:
        """Closed, or idle past the keep-alive expiry."""
        if self._state == CLOSED:
            return True
        keepalive = self._keepalive
        return keepalive is not None and self._used and time.monotonic() - self._idle_since > keepalive

    def _now_idle(self) -> None:
        self._state = IDLE
        self._idle_since = time.monotonic()

    def is_idle(self) -> bool:
        return self._state == IDLE

    def is_closed(self) -> bool:
        return self._state == CLOSED

    def _where(self) -> str:
        return f"{self._host}:{self._port}"

    def get_extra_info(self, info: str) -> Any:
        """The connection is its answers' ``extensions["network_stream"]``, for callers that read a hop's peer
        certificate or addresses as on httpcore's streams: ``ssl_object`` (its ``getpeercert()`` holds the SPIFFE ID
        the mesh verified), ``client_addr``, ``server_addr``, ``socket``; None for other names, or once closed."""
        return None


class Waiter(Generic[C]):
    """A caller waiting at the cap: handed a connection, or room to open one (``given`` None). The pools subclass
    it with their own way of waking the caller."""

    __slots__ = ("closed", "given", "settled")

    def __init__(self) -> None:
        self.given: C | None = None
        self.settled = False  # handed something, gave up, or the pool closed
        self.closed = False  # the pool closed while it waited

    def wake(self) -> None:
        raise NotImplementedError


#: What ``Ledger.checkout`` says when it hands out no connection.
OPEN = "open"  # room under the cap: open a connection (the slot is already counted)
WAIT = "wait"  # at the cap: wait (``enqueue``) for a release


class Ledger(Generic[C]):
    """One endpoint's connections. ``active`` counts the ones checked out or being opened; ``dropped`` collects
    the connections to close (expired, past the keep-alive cap, or returned after ``close``), which the pool
    closes outside any lock and, in async code, where it may await."""

    __slots__ = ("active", "closed", "dropped", "idle", "keep", "limit", "waiters")

    def __init__(self, limit: int, keep: int) -> None:
        self.limit = limit
        self.keep = keep
        self.idle: list[C] = []
        self.active = 0
        self.waiters: collections.deque[Waiter[C]] = collections.deque()
        self.dropped: list[C] = []
        self.closed = False

    def checkout(self) -> C | str:
        """The most recently used idle connection still usable, else ``OPEN`` or ``WAIT``."""
        idle = self.idle
        while idle:
            connection = idle.pop()
            if connection.has_expired():  # closed by the peer or idle too long
                self.dropped.append(connection)
                continue
            self.active += 1
            return connection
        if self.active < self.limit:
            self.active += 1
            return OPEN
        return WAIT

    def enqueue(self, waiter: Waiter[C]) -> None:
        self.waiters.append(waiter)

    def gave_up(self, waiter: Waiter[C]) -> None:
        """A waiter timed out or was cancelled: a release passes it by, and what it was handed just as it gave up
        passes on (the connection to the next waiter or the idle stack; room to open one is freed)."""
        with contextlib.suppress(ValueError):
            self.waiters.remove(waiter)
        if not waiter.settled:
            waiter.settled = True
            return
        if waiter.closed:
            return
        given, waiter.given = waiter.given, None
        if given is not None:
            self.checkin(given)
        else:
            self.active -= 1

    def checkin(self, connection: C) -> None:
        """A request is done with ``connection`` (its answer was read or closed, or it failed)."""
        if self.closed:  # nothing is kept once the client is closed
            self.active -= 1
            self.dropped.append(connection)
            return
        reusable = connection.is_idle() and not connection.is_closed()
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if waiter.settled:
                continue
            # the slot stays counted: it moves to the waiter, with this connection or with room for one
            waiter.given = connection if reusable else None
            waiter.settled = True
            waiter.wake()
            return
        self.active -= 1
        if not reusable:
            return
        idle = self.idle
        idle.append(connection)
        if len(idle) > self.keep:  # keep the most recently used; close the oldest
            self.dropped.append(idle.pop(0))

    def close(self) -> None:
        """The client closed: idle connections are dropped, waiters woken (``closed``), and connections still out
        (a body being read) are dropped when they come back."""
        self.closed = True
        self.dropped.extend(self.idle)
        self.idle = []
        waiters, self.waiters = self.waiters, collections.deque()
        for waiter in waiters:
            if not waiter.settled:
                waiter.settled = waiter.closed = True
                waiter.wake()

    def take_dropped(self) -> list[C]:
        dropped, self.dropped = self.dropped, []
        return dropped

    def connections(self) -> int:
        return self.active + len(self.idle)


class LedgerStack(Generic[C]):
    """What both pools' per-endpoint stacks share: their owner's limits, their origin, their ledger, and the
    views tests and diagnostics read (``idle``, ``active``)."""

    __slots__ = ("ledger", "origin", "owner")

    def __init__(self, owner: Any, origin: tuple[bytes, str, int]) -> None:
        self.owner = owner
        self.origin = origin
        self.ledger: Ledger[C] = Ledger(owner._max, owner._keepalive)

    @property
    def idle(self) -> list[C]:
        return self.ledger.idle

    @property
    def active(self) -> int:
        return self.ledger.active
