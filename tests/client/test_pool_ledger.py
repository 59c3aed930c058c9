"""The pool ledger (client/pool_ledger.py): both engines' reuse, open and wait decisions, once, with no I/O; then
each adapter over real loopback servers: threads at the cap (sync), tasks at the cap under asyncio and trio."""

from __future__ import annotations

import socketserver
import threading
import time
from typing import Any

import anyio
import httpcore
import httpx
import pytest

from meshlib.client.async_pools import AsyncEndpointPools
from meshlib.client.outbound import Outbound
from meshlib.client.pool_ledger import OPEN, WAIT, Ledger, Waiter
from meshlib.client.pools import EndpointPools
from meshlib.client.streams import streaming


class Conn:
    def __init__(self, name: str, *, expired: bool = False) -> None:
        self.name = name
        self.expired = expired
        self.idle = True
        self.closed = False

    def has_expired(self) -> bool:
        return self.expired

    def is_idle(self) -> bool:
        return self.idle

    def is_closed(self) -> bool:
        return self.closed

    def __repr__(self) -> str:
        return self.name


class Woken(Waiter[Conn]):
    def __init__(self) -> None:
        super().__init__()
        self.woken = 0

    def wake(self) -> None:
        self.woken += 1


def test_the_most_recently_used_connection_is_reused_and_expired_ones_dropped():
    ledger: Ledger[Conn] = Ledger(limit=10, keep=10)
    old, stale, recent = Conn("old"), Conn("stale", expired=True), Conn("recent")
    ledger.idle = [old, stale, recent]
    assert ledger.checkout() is recent
    assert ledger.checkout() is old and ledger.take_dropped() == [stale]
    assert ledger.active == 2 and ledger.checkout() is OPEN and ledger.active == 3


def test_at_the_cap_callers_wait_and_a_release_hands_over_in_order():
    ledger: Ledger[Conn] = Ledger(limit=1, keep=5)
    assert ledger.checkout() is OPEN
    assert ledger.checkout() is WAIT
    first, second = Woken(), Woken()
    ledger.enqueue(first)
    ledger.enqueue(second)
    one = Conn("one")
    ledger.checkin(one)
    assert (first.given, first.woken, second.woken, ledger.active) == (one, 1, 0, 1), "the slot moved with it"
    one.idle, one.closed = False, True  # it broke in first's hands: second gets room to open one instead
    ledger.checkin(one)
    assert second.settled and second.given is None and ledger.active == 1
    ledger.checkin(Conn("two"))
    assert ledger.active == 0 and [c.name for c in ledger.idle] == ["two"]


def test_a_waiter_that_gave_up_is_passed_by_and_what_it_was_handed_passes_on():
    ledger: Ledger[Conn] = Ledger(limit=1, keep=5)
    ledger.checkout()
    gone, next_in_line = Woken(), Woken()
    ledger.enqueue(gone)
    ledger.enqueue(next_in_line)
    ledger.gave_up(gone)  # timed out before any release
    conn = Conn("c")
    ledger.checkin(conn)
    assert gone.given is None and next_in_line.given is conn
    # handed a connection just as it was cancelled: the connection goes back, nothing leaks
    late = Woken()
    ledger.enqueue(late)
    ledger.checkin(conn)
    assert late.given is conn
    ledger.gave_up(late)
    assert ledger.active == 0 and ledger.idle == [conn]


def test_past_the_keep_alive_cap_the_oldest_idle_one_is_dropped():
    ledger: Ledger[Conn] = Ledger(limit=10, keep=2)
    conns = [Conn(str(i)) for i in range(3)]
    for _ in conns:
        ledger.checkout()
    for conn in conns:
        ledger.checkin(conn)
    assert ledger.idle == conns[1:] and ledger.take_dropped() == [conns[0]]


def test_closing_drops_idle_ones_wakes_waiters_and_drops_what_comes_back_later():
    ledger: Ledger[Conn] = Ledger(limit=1, keep=5)
    ledger.checkout()
    idle, out = Conn("idle"), Conn("out")
    ledger.idle.append(idle)
    waiter = Woken()
    ledger.enqueue(waiter)
    ledger.close()
    assert waiter.closed and waiter.woken == 1 and ledger.take_dropped() == [idle]
    ledger.checkin(out)  # a body still being read when the client closed
    assert ledger.take_dropped() == [out] and ledger.idle == [] and ledger.connections() == 0


# -- the adapters, over a real server -------------------------------------------------------------------------
class SlowAnswers(socketserver.StreamRequestHandler):
    """Every request on a connection answered after 20 ms, so callers pile up at the cap."""

    def handle(self) -> None:
        while True:
            line = self.rfile.readline()
            if not line:
                return
            while self.rfile.readline() not in (b"\r\n", b""):
                pass
            time.sleep(0.02)
            self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")


class ServerThread:
    def __enter__(self) -> int:
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), SlowAnswers)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return int(self.server.server_address[1])

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


def outbound(port: int, pool_timeout: float = 10.0) -> Outbound:
    timeouts = {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": pool_timeout}
    headers = [(b"host", b"svc")]
    return Outbound(b"GET", b"http", "127.0.0.1", port, b"/", headers, httpx.ByteStream(b""), {"timeout": timeouts})


def test_threads_past_the_cap_wait_their_turn_and_all_get_answers():
    with ServerThread() as port:
        pools = EndpointPools(max_connections=2, max_keepalive_connections=2)
        answers: list[int] = []

        def call() -> None:
            answer = pools.send(outbound(port))
            answers.append(answer.status)

        threads = [threading.Thread(target=call) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert answers == [200] * 12 and pools.connections() == 2
        pools.close()


def test_a_thread_past_the_cap_times_out_with_a_pool_timeout_naming_the_endpoint():
    with ServerThread() as port:
        pools = EndpointPools(max_connections=1)
        token = streaming.set(True)  # as client.stream(): the connection is the caller's until it closes the body
        try:
            held = pools.send(outbound(port))
        finally:
            streaming.reset(token)
        with pytest.raises(httpcore.PoolTimeout, match=rf"no connection to 127.0.0.1:{port} free within 0.2s"):
            pools.send(outbound(port, pool_timeout=0.2))
        held.stream.close()
        assert pools.send(outbound(port)).status == 200, "the slot came back"
        pools.close()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_tasks_past_the_cap_wait_their_turn_under_each_event_loop(backend: str):
    with ServerThread() as port:

        async def main() -> list[int]:
            # as the transport makes them: the lean engine needs asyncio, trio runs on httpcore's connections
            pools = AsyncEndpointPools(max_connections=3, max_keepalive_connections=1, lean=backend == "asyncio")
            statuses: list[int] = []

            async def call() -> None:
                answer = await pools.send(outbound(port))
                statuses.append(answer.status)
                if type(answer.stream) is not bytes:
                    await answer.stream.aclose()

            async with anyio.create_task_group() as group:
                for _ in range(25):
                    group.start_soon(call)
            assert pools.connections() <= 3
            await pools.aclose()
            return statuses

        assert anyio.run(main, backend=backend) == [200] * 25
