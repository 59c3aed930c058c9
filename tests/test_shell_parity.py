"""One scenario, four client shells: the sync and async HTTP clients and the sync and aio gRPC channels are driven by
one driver (``meshlib.calls``), so each scenario here must come out the same through every one of them: retries,
deadlines, breakers, no endpoints, fault aborts, application errors and hedges. Real servers on loopback (uvicorn
for HTTP, grpc servers for gRPC); what differs between protocols (a status code or an exception class) is mapped to
one outcome name before comparing."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

import grpc
import meshlib
import meshlib.grpc
from grpc_support import Behaviour, make_servicer, stubs
from harness import ThreadedServer
from meshlib.discovery import StaticDiscovery
from meshlib.endpoints import Endpoint
from meshlib.rules.model import validate_rules

pb2, pb2_grpc = stubs()
SHELLS = ["http-sync", "http-async", "grpc-sync", "grpc-aio"]


def http_app(behaviour: Behaviour) -> Any:
    """The HTTP twin of the gRPC Echo servicer: 503 when failing (gRPC's UNAVAILABLE), 404 for /missing
    (NOT_FOUND), an optional delay, the instance's name in a JSON answer."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        behaviour.calls += 1
        if scope["path"] == "/missing":
            status, body = 404, {"error": "missing"}
        elif behaviour.fail:
            status, body = 503, {"error": f"{behaviour.instance} is broken"}
        else:
            if behaviour.delay:
                try:
                    await asyncio.sleep(behaviour.delay)
                except asyncio.CancelledError:
                    behaviour.cancelled += 1
                    raise
            status, body = 200, {"instance": behaviour.instance}
        data = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    return app


@dataclass
class Instance:
    behaviour: Behaviour
    port: int
    stop: Callable[[], None]


def start_instance(shell: str, name: str) -> Instance:
    behaviour = Behaviour(name)
    if shell.startswith("http"):
        server = ThreadedServer(http_app(behaviour))
        return Instance(behaviour, server.port, server.stop)
    mesh = meshlib.Mesh(service="echo", discovery=StaticDiscovery({}), control_plane="", telemetry=False)
    grpc_server = meshlib.grpc.server(mesh=mesh, port=0, drain_delay=0)
    pb2_grpc.add_EchoServicer_to_server(make_servicer(behaviour), grpc_server)
    grpc_server.start()

    def stop() -> None:
        grpc_server.stop(0).wait(10)
        mesh.close()

    return Instance(behaviour, grpc_server.port, stop)


@dataclass
class Outcome:
    """What one call came to, in words both protocols share."""

    name: str  # "ok", "not-found", "unavailable" (an answer), or the mesh's verdict: "deadline", "circuit-open"...
    instance: str = ""
    detail: str = ""
    seconds: float = 0.0
    error: BaseException | None = field(default=None, repr=False)


MESH_VERDICTS = {
    meshlib.DeadlineExceededError: "deadline",
    meshlib.CircuitOpenError: "circuit-open",
    meshlib.NoEndpointsError: "no-endpoints",
    meshlib.RetryBudgetExhaustedError: "budget",
    meshlib.UnavailableError: "all-failed",
}
STATUSES = {200: "ok", 404: "not-found", 503: "unavailable", 504: "deadline"}
CODES = {
    grpc.StatusCode.OK: "ok",
    grpc.StatusCode.NOT_FOUND: "not-found",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
    grpc.StatusCode.DEADLINE_EXCEEDED: "deadline",
}


def mesh_verdict(error: BaseException | None) -> str | None:
    for cls, name in MESH_VERDICTS.items():
        if isinstance(error, cls):
            return name
    return None


class Caller:
    """Calls ``echo`` through one shell, ``n`` calls in a row, and names what each came to."""

    def __init__(self, shell: str, mesh: meshlib.Mesh) -> None:
        self.shell = shell
        self.mesh = mesh

    def calls(self, n: int, missing: bool = False) -> list[Outcome]:
        if self.shell == "http-sync":
            with self.mesh.client(timeout=5) as client:
                return [self._timed(lambda: self._http(client.get(self._url(missing)))) for _ in range(n)]
        if self.shell == "http-async":
            return asyncio.run(self._http_async(n, missing))
        if self.shell == "grpc-sync":
            channel = self.mesh.grpc_channel("echo")
            try:
                stub = pb2_grpc.EchoStub(channel)
                return [self._timed(lambda: self._rpc(stub.Say, missing)) for _ in range(n)]
            finally:
                channel.close()
        return asyncio.run(self._grpc_aio(n, missing))

    @staticmethod
    def _url(missing: bool) -> str:
        return "http://echo/missing" if missing else "http://echo/x"

    def _timed(self, call: Callable[[], Outcome]) -> Outcome:
        started = time.perf_counter()
        try:
            outcome = call()
        except (httpx.TransportError, grpc.RpcError) as exc:
            outcome = self._failure(exc)
        outcome.seconds = time.perf_counter() - started
        return outcome

    async def _atimed(self, call: Callable[[], Any]) -> Outcome:
        started = time.perf_counter()
        try:
            outcome = await call()
        except (httpx.TransportError, grpc.RpcError) as exc:
            outcome = self._failure(exc)
        outcome.seconds = time.perf_counter() - started
        return outcome

    @staticmethod
    def _http(response: httpx.Response) -> Outcome:
        body = response.json() if response.headers.get("content-type") == "application/json" else {}
        return Outcome(
            STATUSES.get(response.status_code, str(response.status_code)),
            body.get("instance", ""),
            response.headers.get("x-mesh-fault", ""),
        )

    def _failure(self, exc: BaseException) -> Outcome:
        if isinstance(exc, grpc.RpcError):
            verdict = mesh_verdict(getattr(exc, "mesh_error", None))
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
            details = exc.details() if hasattr(exc, "details") else str(exc)
            fault = "abort" if "fault injected" in (details or "") else ""
            return Outcome(verdict or CODES.get(code, code.name), "", fault or (details or ""), error=exc)
        assert isinstance(exc, meshlib.MeshError), f"an HTTP call's error that is not the mesh's: {exc!r}"
        return Outcome(mesh_verdict(exc) or type(exc).__name__, "", str(exc), error=exc)

    @staticmethod
    def _rpc(method: Any, missing: bool) -> Outcome:
        reply = method(pb2.Hello(text="x", mode="missing" if missing else ""), timeout=5)
        return Outcome("ok", reply.instance)

    async def _http_async(self, n: int, missing: bool) -> list[Outcome]:
        async with self.mesh.async_client(timeout=5) as client:

            async def one() -> Outcome:
                return self._http(await client.get(self._url(missing)))

            return [await self._atimed(one) for _ in range(n)]

    async def _grpc_aio(self, n: int, missing: bool) -> list[Outcome]:
        channel = self.mesh.grpc_aio_channel("echo")
        try:
            stub = pb2_grpc.EchoStub(channel)

            async def one() -> Outcome:
                reply = await stub.Say(pb2.Hello(text="x", mode="missing" if missing else ""), timeout=5)
                return Outcome("ok", reply.instance)

            return [await self._atimed(one) for _ in range(n)]
        finally:
            await channel.close()


@pytest.fixture(params=SHELLS)
def shell(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def pair(shell: str) -> Iterator[list[Instance]]:
    made = [start_instance(shell, name) for name in "ab"]
    yield made
    for instance in made:
        instance.stop()


def caller(shell: str, instances: list[Instance], rules: dict[str, Any]) -> Caller:
    endpoints = [Endpoint("127.0.0.1", i.port) for i in instances]
    mesh = meshlib.Mesh(
        service="front", discovery=StaticDiscovery({"echo": endpoints}), control_plane="", telemetry=False
    )
    mesh.apply_rules(validate_rules({"services": {"echo": rules}}, 1))
    return Caller(shell, mesh)


ROUND_ROBIN = {"load_balancer": "round_robin"}


def test_a_failing_instance_is_retried_on_the_other(shell: str, pair: list[Instance]) -> None:
    pair[0].behaviour.fail = True
    outcomes = caller(shell, pair, {**ROUND_ROBIN, "retries": {"attempts": 2}}).calls(6)
    assert [(o.name, o.instance) for o in outcomes] == [("ok", "b")] * 6
    assert pair[0].behaviour.calls >= 1


def test_the_deadline_ends_the_call_as_a_deadline(shell: str, pair: list[Instance]) -> None:
    for instance in pair:
        instance.behaviour.delay = 1.0
    outcomes = caller(shell, pair, {"timeout": "150ms"}).calls(2)
    assert [o.name for o in outcomes] == ["deadline", "deadline"]
    assert all(o.seconds < 0.8 for o in outcomes), outcomes


def test_open_breakers_fail_fast_without_calling_anyone(shell: str, pair: list[Instance]) -> None:
    for instance in pair:
        instance.behaviour.fail = True
    rules = {
        **ROUND_ROBIN,
        "retries": {"attempts": 1},
        "circuit_breaker": {
            "consecutive_failures": 1,
            "open_for": "60s",
            "max_ejection_percent": 100,
            "panic_threshold_percent": 0,
        },
    }
    call = caller(shell, pair, rules)
    first = call.calls(2)
    assert [o.name for o in first] == ["unavailable", "unavailable"]  # each instance's own answer, once
    before = sum(i.behaviour.calls for i in pair)
    then = call.calls(3)
    assert [o.name for o in then] == ["circuit-open"] * 3
    assert sum(i.behaviour.calls for i in pair) == before


def test_no_endpoints_says_where_discovery_looked(shell: str) -> None:
    call = caller(shell, [], {})
    [outcome] = call.calls(1)
    assert outcome.name == "no-endpoints"
    assert "discovery: static" in outcome.detail, outcome.detail


def test_a_fault_abort_answers_without_calling_anyone(shell: str, pair: list[Instance]) -> None:
    outcomes = caller(shell, pair, {"faults": {"abort": {"percent": 100, "status": 503}}}).calls(2)
    assert [(o.name, o.detail) for o in outcomes] == [("unavailable", "abort")] * 2
    assert sum(i.behaviour.calls for i in pair) == 0


def test_an_application_error_is_the_applications_and_never_retried(shell: str, pair: list[Instance]) -> None:
    outcomes = caller(shell, pair, {**ROUND_ROBIN, "retries": {"attempts": 3}}).calls(2, missing=True)
    assert [o.name for o in outcomes] == ["not-found", "not-found"]
    assert sum(i.behaviour.calls for i in pair) == 2


def test_a_hedge_answers_from_the_fast_instance_without_waiting_for_the_slow(shell: str, pair: list[Instance]) -> None:
    slow, _ = pair
    slow.behaviour.delay = 0.6
    rules = {**ROUND_ROBIN, "hedging": {"delay": "30ms", "budget_percent": 100}}
    outcomes = caller(shell, pair, rules).calls(4)
    assert [(o.name, o.instance) for o in outcomes] == [("ok", "b")] * 4
    assert all(o.seconds < 0.45 for o in outcomes), [round(o.seconds, 3) for o in outcomes]
