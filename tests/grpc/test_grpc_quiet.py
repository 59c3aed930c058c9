"""The quiet unary call (``meshlib/grpc/quiet.py``): a call with nothing to trace, log or route makes its first
attempt with the flow's steps and no call object; anything else that happens to it (a retry, an error status, a
call over before any attempt, an interrupt) is carried on by the driver from where it stands, and ends exactly as
the same call made the full way does. "The full way" here is the same call with metadata of its own (which takes
the call object from the start). Real grpc servers in this process; every form: ``__call__``, ``with_call``,
``future`` and grpc.aio."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import grpc
import meshlib
import meshlib.grpc
from grpc_instances import Instance
from grpc_support import stubs
from harness import free_port
from meshlib.discovery import StaticDiscovery
from meshlib.endpoints import Endpoint
from meshlib.grpc import aio_quiet, quiet
from meshlib.grpc.call import RpcCall
from meshlib.policy.config import RetryPolicy, ServicePolicy

pb2, pb2_grpc = stubs()
OWN = (("x-tenant", "t1"),)  # metadata of the call's own: the full way


@pytest.fixture
def pair() -> Iterator[list[Instance]]:
    made = [Instance(name) for name in "ab"]
    yield made
    for instance in made:
        instance.stop()


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How many call objects were made, and how: from the start (``__init__``) or part way (``carrying_on``)."""
    counts = {"from the start": 0, "carried on": 0}
    init, carrying_on = RpcCall.__init__, RpcCall.carrying_on.__func__  # type: ignore[attr-defined]

    def counted_init(self: RpcCall, *args: Any, **kwargs: Any) -> None:
        counts["from the start"] += 1
        init(self, *args, **kwargs)

    def counted_carrying_on(cls: type[RpcCall], *args: Any) -> RpcCall:
        counts["carried on"] += 1
        made: RpcCall = carrying_on(cls, *args)
        return made

    monkeypatch.setattr(RpcCall, "__init__", counted_init)
    monkeypatch.setattr(RpcCall, "carrying_on", classmethod(counted_carrying_on))
    return counts


def _caller(endpoints: list[Endpoint]) -> meshlib.Mesh:
    return meshlib.Mesh(
        service="front",
        discovery=StaticDiscovery({"echo": endpoints}),
        control_plane="",
        policies={"echo": ServicePolicy(load_balancer="round_robin")},
    )


def _durations(mesh: meshlib.Mesh) -> dict[tuple[str, str], int]:
    """(status class, outcome) -> calls counted, for calls to ``echo``."""
    assert mesh.telemetry is not None
    counted: dict[tuple[str, str], int] = {}
    for point in mesh.telemetry.metrics.client_duration.points():
        labels = point.attributes
        if labels["mesh.peer_service"] == "echo":
            key = (labels["http.response.status_class"], labels["mesh.outcome"])
            counted[key] = counted.get(key, 0) + point.count
    return counted


def _idle(mesh: meshlib.Mesh) -> None:
    """Nothing is left counted in: no endpoint's load has a call outstanding, no endpoint channel a user."""
    state = mesh.service_state("echo")
    assert [h.load.outstanding for h in state.handles] == [0] * len(state.handles)


def _sync_forms(stub: Any) -> dict[str, Callable[..., Any]]:
    return {
        "__call__": lambda request, **kw: stub.Say(request, **kw),
        "with_call": lambda request, **kw: stub.Say.with_call(request, **kw)[0],
        "future": lambda request, **kw: stub.Say.future(request, **kw).result(timeout=10),
    }


def _aio(mesh: meshlib.Mesh, request: Any, **kw: Any) -> Any:
    async def call() -> Any:
        async with mesh.grpc_aio_channel("echo") as channel:
            return await pb2_grpc.EchoStub(channel).Say(request, **kw)

    return asyncio.run(call())


def _outcome(call: Callable[[], Any]) -> tuple[str, str, str]:
    """What the caller sees: ("ok", text, "") or ("error", code name, details)."""
    try:
        return ("ok", call().text, "")
    except grpc.RpcError as exc:
        return ("error", exc.code().name, exc.details())


def test_a_quiet_call_makes_no_call_object_and_ends_as_the_full_way_does(
    pair: list[Instance], built: dict[str, int]
) -> None:
    """OK answers: no call object at all, counted as successes. A call with metadata of its own: the call object
    from the start. Round robin over [down, live]: every other call starts at the instance that is down, is carried
    on part way (one object, made after its first attempt), and is answered by the live one."""
    down = Endpoint("127.0.0.1", free_port())
    with _caller([pair[0].endpoint]) as mesh, mesh.grpc_channel("echo") as channel:
        forms = _sync_forms(pb2_grpc.EchoStub(channel))
        for name, form in forms.items():
            assert form(pb2.Hello(text=name)).text == name
        assert _aio(mesh, pb2.Hello(text="aio")).text == "aio"
        assert built == {"from the start": 0, "carried on": 0}
        assert _durations(mesh) == {("2xx", "success"): 4}
        for form in forms.values():
            assert form(pb2.Hello(text="own"), metadata=OWN).text == "own"
        assert _aio(mesh, pb2.Hello(text="own"), metadata=OWN).text == "own"
        assert built == {"from the start": 4, "carried on": 0}
        _idle(mesh)

    # each form on a mesh of its own, two calls: round robin starts one of them at the instance that is down
    for name in ("__call__", "with_call", "future", "aio"):
        built.update({"from the start": 0, "carried on": 0})
        with _caller([down, pair[1].endpoint]) as mesh, mesh.grpc_channel("echo") as channel:
            if name == "aio":
                texts = [_aio(mesh, pb2.Hello(text=name)).text for _ in range(2)]
            else:
                form = _sync_forms(pb2_grpc.EchoStub(channel))[name]
                texts = [form(pb2.Hello(text=name)).text for _ in range(2)]
            assert texts == [name, name]
            assert mesh.telemetry is not None
            retried = sum(value for _, value in mesh.telemetry.metrics.retries.points())
            assert built == {"from the start": 0, "carried on": retried} and retried >= 1, (name, built)
            assert _durations(mesh) == {("2xx", "success"): 2}
            _idle(mesh)


def test_every_other_end_of_a_quiet_call_is_what_the_full_way_gives(pair: list[Instance]) -> None:
    """An application's error status (not retried), every attempt failing (the error names each endpoint tried),
    a deadline already past and a service with no instance (over before any attempt): the caller sees the same
    code and details whether the call went quietly or the full way, in every form; the same calls are counted."""
    down = Endpoint("127.0.0.1", free_port())
    cases: list[tuple[str, list[Endpoint], Any, dict[str, Any]]] = [
        ("an error status", [pair[0].endpoint], pb2.Hello(text="thing", mode="missing"), {}),
        ("every attempt failing", [down, pair[1].endpoint], pb2.Hello(mode="fail"), {}),
        ("a deadline already past", [pair[0].endpoint], pb2.Hello(text="late"), {"timeout": 0}),
        ("no instance", [], pb2.Hello(text="nobody"), {}),
    ]
    for case, endpoints, request, kw in cases:
        seen: dict[tuple[str, str], tuple[str, str, str]] = {}
        counted: dict[str, dict[tuple[str, str], int]] = {}
        for way, extra in (("quiet", {}), ("full", {"metadata": OWN})):
            with _caller(endpoints) as mesh, mesh.grpc_channel("echo") as channel:
                for name, form in _sync_forms(pb2_grpc.EchoStub(channel)).items():
                    seen[(way, name)] = _outcome(functools.partial(form, request, **kw, **extra))
                seen[(way, "aio")] = _outcome(functools.partial(_aio, mesh, request, **kw, **extra))
                counted[way] = _durations(mesh)
                if endpoints:
                    _idle(mesh)
        for name in ("__call__", "with_call", "future", "aio"):
            assert seen[("quiet", name)] == seen[("full", name)], (case, name)
            assert seen[("quiet", name)][0] == "error", (case, name)
        assert counted["quiet"] == counted["full"], case
    # and what they say is worth saying: the endpoints tried are named
    with (
        _caller([down, pair[1].endpoint]) as mesh,
        mesh.grpc_channel("echo") as channel,
        pytest.raises(grpc.RpcError) as failed,
    ):
        pb2_grpc.EchoStub(channel).Say(pb2.Hello(mode="fail"))
    assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
    assert str(down.port) in failed.value.details() and str(pair[1].endpoint.port) in failed.value.details()


def _interrupt_when_handled(instance: Instance) -> threading.Thread:
    """SIGINT to this (the main) thread once ``instance`` is handling a call: Ctrl-C during the RPC."""
    main = threading.get_ident()
    instance.behaviour.handled.clear()

    def interrupt() -> None:
        if instance.behaviour.handled.wait(10):
            time.sleep(0.05)  # into grpc's wait for the answer (any point inside the RPC will do)
            signal.pthread_kill(main, signal.SIGINT)

    sender = threading.Thread(target=interrupt)
    sender.start()
    return sender


def test_an_interrupted_quiet_call_is_counted_cancelled_and_leaves_nothing_counted_in(pair: list[Instance]) -> None:
    """Ctrl-C in the middle of a quiet call's RPC: the caller gets the KeyboardInterrupt, the endpoint's load and
    channel let go of the call, and it is counted as cancelled, as the full way counts it. A quiet aio call
    cancelled while its RPC runs: CancelledError, counted the same way."""
    slow = pb2.Hello(text="slow", mode="slow", n=2000)
    counted: dict[str, dict[tuple[str, str], int]] = {}
    for way, extra in (("quiet", {}), ("full", {"metadata": OWN})):
        with _caller([pair[0].endpoint]) as mesh, mesh.grpc_channel("echo") as channel:
            stub = pb2_grpc.EchoStub(channel)
            sender = _interrupt_when_handled(pair[0])
            with pytest.raises(KeyboardInterrupt):
                stub.Say(slow, timeout=30, **extra)
            sender.join()
            _idle(mesh)
            assert all(not record.users for record in channel.endpoints._live.values())

            async def cancelled_aio(extra: dict[str, Any]) -> None:
                async with mesh.grpc_aio_channel("echo") as aio_channel:
                    pair[0].behaviour.handled.clear()
                    call = pb2_grpc.EchoStub(aio_channel).Say(slow, timeout=30, **extra)
                    waiter = asyncio.ensure_future(call)
                    while not pair[0].behaviour.handled.is_set():
                        await asyncio.sleep(0.01)
                    assert call.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await waiter

            asyncio.run(cancelled_aio(extra))
            _idle(mesh)
            counted[way] = _durations(mesh)
    assert counted["quiet"] == counted["full"]
    assert sum(n for (_, outcome), n in counted["quiet"].items() if outcome == "cancelled") == 2, counted


def test_logging_turned_on_while_calls_run_reaches_quiet_calls_within_the_recheck(
    pair: list[Instance], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What tracing and logging say is looked at again every ``RECHECK`` seconds: the access log's INFO level (the
    log itself on) or DEBUG on ``meshlib.policy`` turned on while a channel's calls go quietly, and the calls made
    from then on write their lines and decisions within that time; turned off, they go quietly again."""
    monkeypatch.setattr(quiet, "RECHECK", 0.1)
    caplog.set_level(logging.WARNING, logger="meshlib.access")
    with (
        meshlib.Mesh(
            service="front",
            discovery=StaticDiscovery({"echo": [pair[0].endpoint]}),
            control_plane="",
            access_log=True,
        ) as mesh,
        mesh.grpc_channel("echo") as channel,
    ):
        stub = pb2_grpc.EchoStub(channel)
        for logger, level, wanted in (
            ("meshlib.access", logging.INFO, "meshlib.access"),
            ("meshlib.policy", logging.DEBUG, "meshlib.policy"),
        ):
            assert stub.Say(pb2.Hello(text="quiet")).text == "quiet"
            caplog.clear()
            assert not [r for r in caplog.records if r.name == wanted]
            caplog.set_level(level, logger=logger)
            deadline = time.monotonic() + 5
            while not [r for r in caplog.records if r.name == wanted]:
                assert time.monotonic() < deadline, f"{logger} at {logging.getLevelName(level)} never reached a call"
                stub.Say(pb2.Hello(text="heard"))
            caplog.set_level(logging.WARNING, logger=logger)
            time.sleep(0.15)  # past the recheck (the gate is looked at again only when a call comes)
            stub.Say(pb2.Hello(text="looks again"))
            caplog.clear()
            for _ in range(3):
                stub.Say(pb2.Hello(text="quiet again"))
            assert not [r for r in caplog.records if r.name == wanted]


def test_a_quiet_client_stream_is_never_retried(pair: list[Instance], built: dict[str, int]) -> None:
    """Client-streaming calls go quietly too (their requests are an iterator, sent once): an OK answer makes no call
    object; an instance that fails the stream with UNAVAILABLE fails the call, not retried on the other (the
    iterator is spent), and the error names the instance, sync, ``with_call``, ``future`` and aio alike."""
    with _caller([pair[0].endpoint]) as mesh, mesh.grpc_channel("echo") as channel:
        stub = pb2_grpc.EchoStub(channel)
        hellos = [pb2.Hello(text=t) for t in "abc"]
        assert stub.Collect(iter(hellos)).text == "a+b+c"
        assert stub.Collect.with_call(iter(hellos))[0].text == "a+b+c"
        assert stub.Collect.future(iter(hellos)).result(timeout=10).text == "a+b+c"

        async def aio_collect() -> str:
            async with mesh.grpc_aio_channel("echo") as aio_channel:
                call = pb2_grpc.EchoStub(aio_channel).Collect()
                for hello in hellos:
                    await call.write(hello)
                await call.done_writing()
                return str((await call).text)

        assert asyncio.run(aio_collect()) == "a+b+c"
        assert built == {"from the start": 0, "carried on": 0}

    for instance in pair:
        instance.behaviour.fail = True
    with _caller([i.endpoint for i in pair]) as mesh, mesh.grpc_channel("echo") as channel:
        stub = pb2_grpc.EchoStub(channel)
        calls = sum(i.behaviour.calls for i in pair)
        for form in (stub.Collect, stub.Collect.with_call, lambda it: stub.Collect.future(it).result(timeout=10)):
            with pytest.raises(grpc.RpcError) as failed:
                form(iter(hellos))
            assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
            assert any(str(i.endpoint.port) in failed.value.details() for i in pair)
        assert sum(i.behaviour.calls for i in pair) == calls + 3  # once each: never retried on the other
        assert built == {"from the start": 0, "carried on": 3}
        _idle(mesh)


@pytest.fixture(params=["grpc's own call", "the mesh's call"])
def aio_calls(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """A quiet aio unary call is grpc.aio's own call object (``aio_quiet.py``); where a grpc release does not fit
    what that stands on, the mesh's (``aio_calls.UnaryCall``). Both ways, the same behaviour."""
    if request.param == "the mesh's call":
        monkeypatch.setattr(aio_quiet, "FITS", False)
    return str(request.param)


def test_a_quiet_aio_call_tells_of_the_whole_call_not_of_its_first_attempt(
    pair: list[Instance], aio_calls: str
) -> None:
    """Round robin over [down, live], so that every other call's first attempt fails and is retried: whatever waits
    on the call beside its awaiter (a done callback added at once, ``code()`` and ``details()`` awaited in another
    task) hears of its end, OK from the live instance, never of the attempt that failed; ``done()`` is False until
    then. A quiet aio unary call is grpc.aio's own ``UnaryUnaryCall``, unless the grpc release does not fit."""
    down = Endpoint("127.0.0.1", free_port())

    async def main(mesh: meshlib.Mesh) -> None:
        async with mesh.grpc_aio_channel("echo") as channel:
            stub = pb2_grpc.EchoStub(channel)
            for n in range(2):
                call = stub.Say(pb2.Hello(text=f"t{n}"), timeout=10)
                if aio_calls == "grpc's own call":
                    assert isinstance(call, grpc.aio.UnaryUnaryCall) and isinstance(call, aio_quiet.QuietUnaryCall)
                else:
                    assert not isinstance(call, aio_quiet.QuietUnaryCall)
                heard: list[tuple[bool, Any]] = []
                call.add_done_callback(functools.partial(lambda into, c: into.append((c.done(), c)), heard))
                told = asyncio.ensure_future(asyncio.gather(call.code(), call.details()))
                assert not call.done()
                assert (await call).text == f"t{n}"
                assert await told == [grpc.StatusCode.OK, ""]
                assert await call.code() is grpc.StatusCode.OK and not call.cancelled()
                deadline = time.monotonic() + 5
                while not heard:
                    assert time.monotonic() < deadline, "the done callback never ran"
                    await asyncio.sleep(0.01)
                assert heard == [(True, call)] and call.done()

    with _caller([down, pair[1].endpoint]) as mesh:
        asyncio.run(main(mesh))
        assert mesh.telemetry is not None
        assert sum(value for _, value in mesh.telemetry.metrics.retries.points()) == 1
        assert _durations(mesh) == {("2xx", "success"): 2}
        _idle(mesh)


def test_a_quiet_aio_call_nobody_awaits_fails_quietly_and_channel_close_cancels_one_in_flight(
    pair: list[Instance], aio_calls: str
) -> None:
    """A quiet aio call that fails and that nobody awaits is recorded, tells its status when asked, and leaves
    asyncio nothing to log ("exception was never retrieved"). Closing the channel cancels a quiet call still in
    flight, as grpc.aio's ``Channel.close()`` does, and the call lets go of its endpoint."""
    down = Endpoint("127.0.0.1", free_port())
    logged: list[dict[str, Any]] = []

    async def unawaited(mesh: meshlib.Mesh) -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: logged.append(context))
        async with mesh.grpc_aio_channel("echo") as channel:
            call = pb2_grpc.EchoStub(channel).Say(pb2.Hello(text="nobody waits"), timeout=10)
            deadline = time.monotonic() + 10
            while not call.done():
                assert time.monotonic() < deadline, "the call never ended"
                await asyncio.sleep(0.01)
            assert await call.code() is grpc.StatusCode.UNAVAILABLE
            assert str(down.port) in await call.details()
            if isinstance(call, aio_quiet.QuietUnaryCall):  # its task's error is marked as seen (what asyncio logs)
                assert not call._invocation_task._log_traceback
            del call
            gc.collect()
        await asyncio.sleep(0)

    with _caller([down]) as mesh:
        asyncio.run(unawaited(mesh))
        gc.collect()
        assert _durations(mesh) == {("5xx", "server-error"): 1}
        _idle(mesh)
    # (grpc.aio's own poller may report the loop closed under it at shutdown: not what this is about)
    assert [c for c in logged if "never retrieved" in str(c.get("message"))] == []

    async def closed(mesh: meshlib.Mesh) -> None:
        channel = mesh.grpc_aio_channel("echo")
        pair[0].behaviour.handled.clear()
        call = pb2_grpc.EchoStub(channel).Say(pb2.Hello(text="slow", mode="slow", n=3000), timeout=30)
        while not pair[0].behaviour.handled.is_set():
            await asyncio.sleep(0.01)
        started = time.monotonic()
        await channel.close()
        with pytest.raises((asyncio.CancelledError, grpc.aio.AioRpcError)):
            await call
        assert time.monotonic() - started < 2, "closing the channel waited for the call in flight"
        assert await call.code() is grpc.StatusCode.CANCELLED

    with _caller([pair[0].endpoint]) as mesh:
        asyncio.run(closed(mesh))
        _idle(mesh)
        assert sum(n for (_, outcome), n in _durations(mesh).items() if outcome == "cancelled") == 1


def test_a_quiet_aio_call_cancelled_between_its_first_attempt_and_its_judgement_ends_cancelled(
    pair: list[Instance],
) -> None:
    """``cancel()`` in the moment between the first attempt's failure and its judgement (here: from grpc's own done
    callback on that attempt, which runs before the call's invocation resumes) is honoured: no retry is sent, the
    awaiter gets ``CancelledError``, the call says CANCELLED and is counted as cancelled."""
    pair[0].behaviour.fail = True
    accepted: list[bool] = []

    async def main(mesh: meshlib.Mesh) -> None:
        async with mesh.grpc_aio_channel("echo") as channel:
            call = pb2_grpc.EchoStub(channel).Say(pb2.Hello(text="x"), timeout=10)
            assert isinstance(call, aio_quiet.QuietUnaryCall)
            aio_quiet._GrpcUnaryUnaryCall.add_done_callback(call, lambda c: accepted.append(c.cancel()))
            with pytest.raises(asyncio.CancelledError):
                await call
            assert accepted == [True] and call.cancelled() and call.done()
            assert await call.code() is grpc.StatusCode.CANCELLED
            assert await call.details() == "Locally cancelled by application!"

    with _caller([pair[0].endpoint]) as mesh:
        asyncio.run(main(mesh))
        assert pair[0].behaviour.calls == 1  # not retried
        _idle(mesh)
        assert sum(n for (_, outcome), n in _durations(mesh).items() if outcome == "cancelled") == 1


def test_grpc_s_own_retries_are_the_application_s_to_turn_on(pair: list[Instance]) -> None:
    """The mesh's endpoint channels have grpc's retry layer off (the mesh retries, on another instance). An
    application whose channel options give a service config with a retry policy gets grpc's retries as well: the
    failing instance sees grpc's attempts for each of the mesh's."""
    pair[0].behaviour.fail = True
    config = (
        '{"methodConfig": [{"name": [{}], "retryPolicy": {"maxAttempts": 2, "initialBackoff": "0.01s",'
        ' "maxBackoff": "0.01s", "backoffMultiplier": 1, "retryableStatusCodes": ["UNAVAILABLE"]}}]}'
    )
    seen = {}
    for way, options in (("the mesh's", None), ("grpc's too", [("grpc.service_config", config)])):
        pair[0].behaviour.calls = 0
        with (
            meshlib.Mesh(
                service="front",
                discovery=StaticDiscovery({"echo": [pair[0].endpoint]}),
                control_plane="",
                policies={"echo": ServicePolicy(retries=RetryPolicy(attempts=1))},
            ) as mesh,
            mesh.grpc_channel("echo", options=options) as channel,
            pytest.raises(grpc.RpcError) as failed,
        ):
            pb2_grpc.EchoStub(channel).Say(pb2.Hello(text="x"), timeout=10)
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
        seen[way] = pair[0].behaviour.calls
    assert seen == {"the mesh's": 1, "grpc's too": 2}


def _threads_made() -> int:
    """How many ``threading.Thread`` objects this process has made so far: the number in a new thread's default
    name ("Thread-N"), which counts every thread made."""
    return int(threading.Thread().name.split("-")[1])


def test_sequential_futures_reuse_grpc_s_channel_thread(pair: list[Instance]) -> None:
    """grpc runs a channel's futures on a thread that lives while the channel has a managed call in flight, so a
    plain channel starts a new one for each future that follows another. The mesh hands an attempt's end to the
    caller waiting in ``result()`` and lets grpc's thread yield the GIL at once, so the caller's next future
    finds the thread still counted in and reuses it: 40 sequential futures make 40 threads on a plain channel,
    a few through the mesh."""
    calls = 40

    def threads_for(say: Any) -> int:
        say.future(pb2.Hello(text="warm")).result(timeout=10)
        before = _threads_made()
        for n in range(calls):
            assert say.future(pb2.Hello(text=str(n)), timeout=10).result().text == str(n)
        return _threads_made() - before - 1

    with _caller([pair[0].endpoint]) as mesh, mesh.grpc_channel("echo") as channel:
        meshed = threads_for(pb2_grpc.EchoStub(channel).Say)
        with grpc.insecure_channel(pair[0].endpoint.authority) as plain_channel:
            plain = threads_for(pb2_grpc.EchoStub(plain_channel).Say)
    assert plain > calls // 2, f"a plain channel was expected to start a thread per future: {plain}"
    assert meshed < calls // 4, meshed
