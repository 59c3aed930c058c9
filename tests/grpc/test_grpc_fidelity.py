"""The gRPC channels behave as grpc's own where code written for grpc can tell (issue 30's items, one test each):
real grpc servers in this process, stubs generated from tests/protos/echo.proto."""

from __future__ import annotations

import asyncio
import gc
import signal
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

import grpc
import meshlib
import meshlib.grpc
from grpc import aio
from grpc_instances import Instance
from grpc_support import stubs
from harness import wait_for
from meshlib.discovery import StaticDiscovery
from meshlib.endpoints import Endpoint
from meshlib.grpc.aio_quiet import QuietUnaryCall
from meshlib.rules.model import validate_rules

pb2, pb2_grpc = stubs()


@pytest.fixture
def pair() -> Iterator[list[Instance]]:
    made = [Instance(name) for name in "ab"]
    yield made
    for instance in made:
        instance.stop()


def caller(endpoints: list[Endpoint], rules: dict[str, object] | None = None) -> meshlib.Mesh:
    mesh = meshlib.Mesh(
        service="front", discovery=StaticDiscovery({"echo": endpoints}), control_plane="", telemetry=False
    )
    if rules:
        mesh.apply_rules(validate_rules({"services": {"echo": rules}}, 1))
    return mesh


def test_a_sync_stream_over_before_it_started_fails_when_read_not_when_made(pair: list[Instance]) -> None:
    """Item 7: grpc returns the call object and raises from iterating it; so does the mesh, for a deadline that
    has already passed and for a service with no instance."""
    with caller([i.endpoint for i in pair]) as mesh, mesh.grpc_channel("echo") as channel:
        stub = pb2_grpc.EchoStub(channel)
        responses = stub.Count(pb2.Hello(text="x", n=3), timeout=0)  # no raise here
        with pytest.raises(grpc.RpcError) as caught:
            next(responses)
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert responses.code() is grpc.StatusCode.DEADLINE_EXCEEDED and responses.done()
        assert [r.text for r in stub.Count(pb2.Hello(text="x", n=2), timeout=5)] == ["x-0", "x-1"]
    with caller([]) as empty, empty.grpc_channel("echo") as channel:
        responses = pb2_grpc.EchoStub(channel).Count(pb2.Hello(text="x", n=3), timeout=5)
        with pytest.raises(grpc.RpcError) as caught:
            list(responses)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "discovery" in caught.value.details()


def test_aio_mesh_errors_are_aio_rpc_errors(pair: list[Instance]) -> None:
    """Item 6: ``except grpc.aio.AioRpcError`` catches what the mesh raises: no endpoints, every attempt failed,
    a fault abort, and a stream over before it started."""
    for instance in pair:
        instance.behaviour.fail = True

    async def main() -> list[tuple[grpc.StatusCode, str]]:
        seen = []
        with caller([]) as empty:
            async with empty.grpc_aio_channel("echo") as channel:
                try:
                    await pb2_grpc.EchoStub(channel).Say(pb2.Hello(text="x"), timeout=5)
                except aio.AioRpcError as exc:
                    seen.append((exc.code(), exc.details()))
                try:
                    async for _ in pb2_grpc.EchoStub(channel).Count(pb2.Hello(text="x", n=1), timeout=5):
                        pass
                except aio.AioRpcError as exc:
                    seen.append((exc.code(), exc.details()))
        with caller([i.endpoint for i in pair], {"retries": {"attempts": 2}}) as mesh:
            async with mesh.grpc_aio_channel("echo") as channel:
                try:
                    await pb2_grpc.EchoStub(channel).Say(pb2.Hello(text="x"), timeout=5)
                except aio.AioRpcError as exc:
                    seen.append((exc.code(), exc.details()))
        with caller([i.endpoint for i in pair], {"faults": {"abort": {"status": 503}}}) as mesh:
            async with mesh.grpc_aio_channel("echo") as channel:
                call = pb2_grpc.EchoStub(channel).Say(pb2.Hello(text="x"), timeout=5)
                try:
                    await call
                except aio.AioRpcError as exc:
                    seen.append((exc.code(), exc.details()))
                assert await call.code() is grpc.StatusCode.UNAVAILABLE
        return seen

    seen = asyncio.run(main())
    assert [code for code, _ in seen] == [grpc.StatusCode.UNAVAILABLE] * 4
    assert "discovery" in seen[0][1] and "discovery" in seen[1][1]
    assert "2 attempt(s) failed" in seen[2][1]
    assert "fault injected" in seen[3][1]


def test_aio_cancel_is_seen_at_once_and_a_cancelled_stream_reports_cancelled(pair: list[Instance]) -> None:
    """Item 5: ``cancelled()`` is true right after ``cancel()``; a stream cancelled before it started answers
    ``code()``/``details()`` with CANCELLED instead of raising."""

    async def main() -> None:
        with caller([i.endpoint for i in pair]) as mesh:
            async with mesh.grpc_aio_channel("echo") as channel:
                stub = pb2_grpc.EchoStub(channel)
                call = stub.Say(pb2.Hello(text="x", mode="slow", n=2000), timeout=10)
                await asyncio.sleep(0.05)
                assert call.cancel() and call.cancelled()
                with pytest.raises(asyncio.CancelledError):
                    await call
                assert await call.code() is grpc.StatusCode.CANCELLED
                stream = stub.Count(pb2.Hello(text="x", n=3), timeout=10)
                assert stream.cancel()
                assert await stream.code() is grpc.StatusCode.CANCELLED
                assert isinstance(await stream.details(), str)
                reply = await stub.Say(pb2.Hello(text="after"), timeout=10)  # the channel still works
                assert reply.text == "after"

    asyncio.run(main())


def test_aio_client_streaming_without_an_iterator_takes_writes(pair: list[Instance]) -> None:
    """Item 4: ``call = stub.Collect()``, then ``write()`` and ``done_writing()``, as with grpc.aio."""

    async def main() -> str:
        with caller([i.endpoint for i in pair]) as mesh:
            async with mesh.grpc_aio_channel("echo") as channel:
                call = pb2_grpc.EchoStub(channel).Collect(timeout=10)
                for text in "abc":
                    await call.write(pb2.Hello(text=text))
                await call.done_writing()
                with pytest.raises(aio.UsageError):
                    await call.write(pb2.Hello(text="late"))
                reply = await call
                assert await call.code() is grpc.StatusCode.OK
                return str(reply.text)

    assert asyncio.run(main()) == "a+b+c"


def test_a_sync_future_is_a_grpc_future_and_a_grpc_call(pair: list[Instance]) -> None:
    """Item 1: ``.future()`` answers ``code()``, ``details()`` and the metadata, as grpc's own future does."""
    with caller([i.endpoint for i in pair]) as mesh, mesh.grpc_channel("echo") as channel:
        stub = pb2_grpc.EchoStub(channel)
        future = stub.Say.future(pb2.Hello(text="x"), timeout=5)
        assert isinstance(future, grpc.Future) and isinstance(future, grpc.Call)
        assert future.result(timeout=5).text == "x"
        assert future.code() is grpc.StatusCode.OK and future.done() and not future.running()
        assert future.exception() is None
        assert future.trailing_metadata() is not None and future.initial_metadata() is not None
        missing = stub.Say.future(pb2.Hello(text="thing", mode="missing"), timeout=5)
        with pytest.raises(grpc.RpcError) as caught:
            missing.result(timeout=5)
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND
        assert missing.code() is grpc.StatusCode.NOT_FOUND and missing.details() == "no thing"
        error = missing.exception()
        assert isinstance(error, grpc.RpcError) and error.code() is grpc.StatusCode.NOT_FOUND
        done: list[object] = []
        late = stub.Say.future(pb2.Hello(text="y"), timeout=5)
        late.add_done_callback(done.append)
        late.result(timeout=5)
        wait_for(lambda: done == [late], timeout=5, what="the done callback, with the future")


def test_a_finished_sync_future_is_freed_by_reference_counting(pair: list[Instance]) -> None:
    """A finished ``.future()`` (answered at once, or retried after a pause) is in no reference cycle: once the
    caller lets go, it and its answer are freed at once, not at the garbage collector's next pass (large answers
    kept until then made ``.future()`` cost 1.3x grpc's own). A failed one is left out: the error it raises holds
    its traceback, which holds the future, as grpc's own failed futures do."""
    pair[0].behaviour.fail = True
    rules = {"load_balancer": "round_robin", "retries": {"attempts": 3}}
    with caller([i.endpoint for i in pair], rules) as mesh, mesh.grpc_channel("echo") as channel:
        stub = pb2_grpc.EchoStub(channel)
        stub.Say.future(pb2.Hello(text="warm"), timeout=5).exception(timeout=5)
        gc.collect()
        gc.disable()
        try:
            left: list[weakref.ref[Any]] = []
            for n in range(4):
                future = stub.Say.future(pb2.Hello(text=f"{n}" * 100_000), timeout=5)
                assert future.result(timeout=5).instance == "b"
                left.append(weakref.ref(future))
                del future
            assert pair[0].behaviour.calls >= 1, "round robin sent calls to the failing instance: they were retried"
            wait_for(lambda: all(ref() is None for ref in left), timeout=5, what="every finished future freed")
        finally:
            gc.enable()


def test_cancelling_a_sync_future_reaches_the_rpc_in_flight(pair: list[Instance]) -> None:
    """Item 2: ``cancel()`` on a started call returns True, the caller is answered at once, and the server sees
    its call cancelled."""
    with caller([i.endpoint for i in pair]) as mesh, mesh.grpc_channel("echo") as channel:
        stub = pb2_grpc.EchoStub(channel)
        future = stub.Say.future(pb2.Hello(text="x", mode="slow", n=1500), timeout=10)
        wait_for(lambda: any(i.behaviour.handled.is_set() for i in pair), timeout=5, what="the call at a server")
        started = time.monotonic()
        assert future.cancel()
        assert future.cancelled() and future.done()
        with pytest.raises(grpc.FutureCancelledError):
            future.result(timeout=5)
        assert time.monotonic() - started < 1.0, "the caller waited for the cancelled call"
        assert future.code() is grpc.StatusCode.CANCELLED
        wait_for(lambda: sum(i.behaviour.cancelled for i in pair) == 1, timeout=10, what="the server to see it")
        assert not future.cancel()  # once done, as grpc's
        assert stub.Say(pb2.Hello(text="after"), timeout=5).text == "after"


def test_open_uploads_through_futures_never_starve_other_futures() -> None:
    """Item 3: 70 client-streaming ``.future()`` uploads left open (more than the shared worker pool's 64
    threads) do not keep another ``.future()`` from its answer or its deadline. (The server gets enough workers
    for them all, so that only the client could starve.)"""
    release = threading.Event()

    def held_open() -> Iterator[object]:
        yield pb2.Hello(text="a")
        release.wait(30)

    pair = [Instance(name, max_workers=100) for name in "ab"]
    try:
        with caller([i.endpoint for i in pair]) as mesh, mesh.grpc_channel("echo") as channel:
            stub = pb2_grpc.EchoStub(channel)
            uploads = [stub.Collect.future(held_open(), timeout=30) for _ in range(70)]
            try:
                started = time.monotonic()
                assert stub.Say.future(pb2.Hello(text="x"), timeout=5).result(timeout=10).text == "x"
                slow = stub.Say.future(pb2.Hello(text="x", mode="slow", n=2000), timeout=0.3)
                with pytest.raises(grpc.RpcError) as caught:
                    slow.result(timeout=10)
                assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
                assert time.monotonic() - started < 5
            finally:
                release.set()
            assert all(upload.result(timeout=30).text == "a" for upload in uploads)
    finally:
        for instance in pair:
            instance.stop()


def _future_threads() -> int:
    return sum(t.name.startswith("meshlib-future") for t in threading.enumerate())


def test_a_sync_future_holds_no_thread_and_still_retries_pauses_and_answers(pair: list[Instance]) -> None:
    """Item 10: a ``.future()`` is driven by its attempts' completions, as grpc's own futures are, so no thread
    waits on it: a call retried on another instance (UNAVAILABLE from the first), one behind an injected delay
    and one that fails all end as they should, and not one thread was started for them."""
    pair[0].behaviour.fail = True
    before = _future_threads()
    rules = {"load_balancer": "round_robin", "retries": {"attempts": 3}, "faults": {"delay": {"duration": "200ms"}}}
    with caller([i.endpoint for i in pair], rules) as mesh, mesh.grpc_channel("echo") as channel:
        stub = pb2_grpc.EchoStub(channel)
        started = time.monotonic()
        futures = []
        for n in range(20):  # each checked as soon as it exists: making all 20 may take longer than the delay
            futures.append(stub.Say.future(pb2.Hello(text=f"x{n}"), timeout=5))
            assert not futures[-1].done(), "the injected delay comes before the call"
        answers = [f.result(timeout=10) for f in futures]
        assert [a.text for a in answers] == [f"x{n}" for n in range(20)]
        assert {a.instance for a in answers} == {"b"}, "each call that met the broken instance was retried"
        assert pair[0].behaviour.calls >= 5, "round robin sent calls to the broken instance first"
        assert time.monotonic() - started >= 0.2
        assert all(f.code() is grpc.StatusCode.OK for f in futures)
        pair[1].behaviour.fail = True
        failed = stub.Say.future(pb2.Hello(text="y"), timeout=5)
        with pytest.raises(grpc.RpcError) as caught:
            failed.result(timeout=10)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE and "attempt(s) failed" in caught.value.details()
        assert failed.code() is grpc.StatusCode.UNAVAILABLE
    assert _future_threads() == before, "a thread was started for an unhedged future"


def test_a_caller_waiting_on_a_sync_future_carries_the_call_on_in_its_own_thread(pair: list[Instance]) -> None:
    """A thread waiting in ``result()`` is handed each attempt's end (a retry included) and ends the call itself:
    the call's done-callbacks run in that thread, not on grpc's. A future nobody waits on is carried on by grpc's
    thread, as before; one waited on with a timeout too (its wait stays a plain bounded wait)."""
    pair[0].behaviour.fail = True  # round robin: the first call meets the broken one, and is retried on b
    rules = {"load_balancer": "round_robin", "retries": {"attempts": 3}}
    with caller([i.endpoint for i in pair], rules) as mesh, mesh.grpc_channel("echo") as channel:
        stub = pb2_grpc.EchoStub(channel)
        me = threading.current_thread()
        for n in range(4):
            ended_on: list[threading.Thread] = []
            future = stub.Say.future(pb2.Hello(text=f"x{n}", mode="slow", n=200), timeout=10)
            future.add_done_callback(lambda _, into=ended_on: into.append(threading.current_thread()))
            assert future.result().text == f"x{n}"
            assert ended_on == [me], f"call {n} was ended on {ended_on}"
        assert pair[0].behaviour.calls >= 2, "calls met the broken instance and were retried"
        future = stub.Say.future(pb2.Hello(text="z", mode="slow", n=200), timeout=10)
        beside: list[str] = []
        others = [threading.Thread(target=lambda: beside.append(future.result().text)) for _ in range(3)]
        for other in others:
            other.start()
        assert future.result().text == "z"  # four waiters: one carries the call on, the others wait for its end
        for other in others:
            other.join(10)
        assert beside == ["z", "z", "z"]
        for wait in (None, 10.0):
            ended_on = []
            future = stub.Say.future(pb2.Hello(text="y", mode="slow", n=100), timeout=10)
            future.add_done_callback(lambda _, into=ended_on: into.append(threading.current_thread()))
            if wait is None:
                wait_for(lambda into=ended_on: bool(into), timeout=10, what="the unwaited future to end")
            else:
                assert future.result(timeout=wait).text == "y"
                wait_for(lambda into=ended_on: bool(into), timeout=10, what="the future's callback")
            assert ended_on[0] is not me
            assert future.result().text == "y" and future.code() is grpc.StatusCode.OK


def test_an_interrupted_wait_on_a_sync_future_leaves_the_call_to_end_on_its_own(pair: list[Instance]) -> None:
    """Ctrl-C in ``result()`` (the thread offered to carry the call on) withdraws the offer: the call still ends,
    carried on by grpc's thread, and a later ``result()`` has its answer."""
    with caller([pair[1].endpoint]) as mesh, mesh.grpc_channel("echo") as channel:
        stub = pb2_grpc.EchoStub(channel)
        future = stub.Say.future(pb2.Hello(text="x", mode="slow", n=1000), timeout=10)
        main = threading.get_ident()

        def interrupt() -> None:  # once the waiter is blocked in its offer (so never outside the raises below)
            deadline = time.monotonic() + 5
            while not future._blocked and not future.done() and time.monotonic() < deadline:
                time.sleep(0.005)
            if future._blocked:
                signal.pthread_kill(main, signal.SIGINT)

        sender = threading.Thread(target=interrupt)
        sender.start()
        with pytest.raises(KeyboardInterrupt):
            future.result()
        sender.join()
        assert future.result(timeout=10).text == "x"
        assert future.code() is grpc.StatusCode.OK and not future._volunteer


def test_an_aio_call_runs_unawaited_and_one_driven_in_its_awaiter_cancels(pair: list[Instance]) -> None:
    """Item 10: an aio unary call awaited at once is driven in its awaiter (no task of its own); one not awaited
    still starts by the next turn of the loop, as grpc.aio's do; ``cancel()`` on a call its awaiter drives reaches
    the RPC in flight and the awaiter gets ``CancelledError``, as with grpc.aio."""

    async def main() -> None:
        with caller([i.endpoint for i in pair]) as mesh:
            async with mesh.grpc_aio_channel("echo") as channel:
                stub = pb2_grpc.EchoStub(channel)
                unawaited = stub.Say(pb2.Hello(text="alone"), timeout=10)
                deadline = time.monotonic() + 5
                while sum(i.behaviour.calls for i in pair) < 1:
                    assert time.monotonic() < deadline, "a call nobody awaited never reached a server"
                    await asyncio.sleep(0.01)
                assert (await unawaited).text == "alone" and unawaited.done()
                assert (await unawaited).text == "alone"  # awaiting twice, as grpc.aio allows

                for instance in pair:
                    instance.behaviour.handled.clear()
                made: list[Any] = []

                async def make_and_await() -> object:
                    made.append(stub.Say(pb2.Hello(text="x", mode="slow", n=3000), timeout=10))
                    return await made[0]  # at once, in this task: driven here

                awaiter = asyncio.ensure_future(make_and_await())
                while not any(i.behaviour.handled.is_set() for i in pair):
                    assert time.monotonic() < deadline + 5, "the slow call never reached a server"
                    await asyncio.sleep(0.01)
                slow = made[0]
                # grpc.aio's own call (a quiet one: no task beside grpc's own), or the mesh's driven in its awaiter
                assert isinstance(slow, QuietUnaryCall) or slow._task is None, "a call awaited at once got a task"
                started = time.monotonic()
                assert slow.cancel() and slow.cancelled()
                with pytest.raises(asyncio.CancelledError):
                    await awaiter
                assert time.monotonic() - started < 1.0, "the awaiter waited for the cancelled call"
                assert await slow.code() is grpc.StatusCode.CANCELLED
                assert not slow.cancel()
                assert (await stub.Say(pb2.Hello(text="after"), timeout=10)).text == "after"

    asyncio.run(main())
    wait_for(lambda: sum(i.behaviour.cancelled for i in pair) == 1, timeout=10, what="the server to see the cancel")
