"""The endpoint channels' ledger under threads: calls count themselves in and out without the lock, so a channel
retired while calls race to use it must never be closed under a call, and must be closed exactly once after its
last one. (Seen red: with the check for retirement made before counting in, and a thread switch forced between
the two, a call gets a closed channel; with the close not claimed by one releaser, a channel is closed twice.)"""

from __future__ import annotations

import sys
import threading
import time
from types import SimpleNamespace
from typing import Any

import meshlib
from meshlib.discovery import StaticDiscovery
from meshlib.endpoints import Endpoint
from meshlib.grpc.endpoints import EndpointChannels


class LedgerChannel:
    """A channel that only says whether, and how often, it was closed."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.closes = 0


def _state(endpoints: list[Endpoint]) -> Any:
    """What ``acquire`` reads of a service's state: a snapshot identity and its handles."""
    handles = tuple(SimpleNamespace(key=e.key, endpoint=e) for e in endpoints)
    return SimpleNamespace(snapshot=object(), handles=handles)


def test_a_retired_channel_is_never_closed_under_a_call_and_closed_once_after_its_last() -> None:
    a, b = Endpoint("127.0.0.1", 1), Endpoint("127.0.0.1", 2)
    mesh = meshlib.Mesh(service="ledger", discovery=StaticDiscovery({"echo": [a, b]}), control_plane="")
    made: list[LedgerChannel] = []
    faults: list[str] = []

    def make(target: str, credentials: Any, options: Any) -> LedgerChannel:
        channel = LedgerChannel(target)
        made.append(channel)
        return channel

    def close(channel: LedgerChannel) -> None:
        channel.closes += 1

    channels = EndpointChannels(mesh, "echo", make=make, close=close)
    states = [_state([a, b]), _state([a]), _state([b]), _state([a, b])]
    current = [states[0]]
    stop = threading.Event()

    def caller() -> None:
        n = 0
        while not stop.is_set():
            state = current[0]
            endpoint = state.handles[n % len(state.handles)].endpoint
            n += 1
            record = channels.acquire(endpoint, state)
            for _ in range(50):  # a call in flight: let the flipper run meanwhile
                if record.channel.closes:
                    faults.append(f"{record.label} closed under a call")
                    break
            channels.release(record)

    callers = [threading.Thread(target=caller) for _ in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch every few bytecodes: every interleaving of the ledger's steps
    try:
        for thread in callers:
            thread.start()
        deadline = time.monotonic() + 3
        flips = 0
        while time.monotonic() < deadline:
            current[0] = states[flips % len(states)] if flips % 7 else _state([a, b])  # fresh snapshots too
            flips += 1
            for _ in range(20):
                if faults:
                    break
        stop.set()
        for thread in callers:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    last = _state([])
    record = channels.acquire(a, last)  # the last snapshot lists nothing: every channel is retired...
    channels.release(record)  # ...but the one this call opened, retired by the next snapshot
    channels._follow(_state([]))
    mesh.close()

    assert not faults, faults[:5]
    assert len(made) > 10, "the flips retired and remade channels"
    assert channels.retiring() == []
    assert not channels.labels()
    assert sorted({c.closes for c in made}) == [1], [c.closes for c in made if c.closes != 1][:5]


def test_endpoint_channels_leave_retries_to_the_mesh_unless_the_application_asks_for_grpc_s() -> None:
    """grpc's own retry layer keeps every call's history for a transparent retry, which on a channel to one
    endpoint could only go to the same instance: the mesh retries on another, so its endpoint channels are made
    with ``grpc.enable_retries`` 0. An application that set that option, or gave a service config (which may
    hold a retry policy), keeps what it chose."""
    a = Endpoint("127.0.0.1", 1)
    mesh = meshlib.Mesh(service="ledger", discovery=StaticDiscovery({"echo": [a]}), control_plane="")
    config = '{"methodConfig": [{"name": [{}], "retryPolicy": {"maxAttempts": 3}}]}'
    try:
        for given, wanted in (
            ((), 0),
            ((("grpc.enable_retries", 1),), 1),
            ((("grpc.service_config", config),), None),
        ):
            made: list[dict[str, Any]] = []

            def make(target: str, credentials: Any, options: Any, into: list[dict[str, Any]] = made) -> LedgerChannel:
                into.append(dict(options))
                return LedgerChannel(target)

            channels = EndpointChannels(mesh, "echo", make=make, close=lambda channel: None, options=given)
            channels.release(channels.acquire(a, _state([a])))
            (options,) = made
            assert options.get("grpc.enable_retries") == wanted, (given, options)
            assert all(options[name] == value for name, value in given)
    finally:
        mesh.close()
