"""gRPC test parts: stubs generated from tests/protos/echo.proto with grpcio-tools at test time, the Echo servicer
(sync and aio) and a gRPC upstream in its own process (tests/grpc_upstream.py)."""

from __future__ import annotations

import asyncio
import importlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc

HERE = Path(__file__).parent
_generated: Path | None = None
_lock = threading.Lock()


def generate(proto: Path, out: Path) -> None:
    """Run protoc (grpcio-tools) on ``proto`` into ``out``."""
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    code = protoc.main(["protoc", f"-I{proto.parent}", f"--python_out={out}", f"--grpc_python_out={out}", str(proto)])
    if code != 0:
        raise RuntimeError(f"protoc failed on {proto} ({code})")


def generated_dir() -> Path:
    global _generated
    with _lock:
        if _generated is None:
            out = Path(tempfile.mkdtemp(prefix="meshlib-grpc-stubs-"))
            generate(HERE / "protos" / "echo.proto", out)
            _generated = out
    return _generated


def stubs() -> tuple[ModuleType, ModuleType]:
    """(echo_pb2, echo_pb2_grpc)."""
    path = str(generated_dir())
    if path not in sys.path:
        sys.path.insert(0, path)
    return importlib.import_module("echo_pb2"), importlib.import_module("echo_pb2_grpc")


def _trace_id() -> str:
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else ""


def _peer() -> str:
    from meshlib.inbound import peer_identity

    peer = peer_identity.get()
    return peer.uri if peer is not None else ""


class Behaviour:
    """What an instance does with each call; changed at run time by tests (or by a 'behave' call)."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.fail = False
        self.delay = 0.0
        self.calls = 0
        #: Calls whose caller cancelled them while the handler was still at work.
        self.cancelled = 0
        self.handled = threading.Event()
        #: The meshlib.Client a "call-http" request calls through (else one on the process default mesh).
        self.http_client: Any = None


def make_servicer(behaviour: Behaviour) -> Any:
    pb2, pb2_grpc = stubs()

    class Echo(pb2_grpc.EchoServicer):  # type: ignore[misc, name-defined]
        def _reply(self, request: Any, context: Any) -> Any:
            behaviour.calls += 1
            behaviour.handled.set()
            if behaviour.fail or request.mode == "fail":
                context.abort(grpc.StatusCode.UNAVAILABLE, f"{behaviour.instance} is broken")
            if request.mode == "missing":
                context.abort(grpc.StatusCode.NOT_FOUND, f"no {request.text}")
            delay = behaviour.delay + (request.n / 1000 if request.mode == "slow" else 0)
            if delay:
                time.sleep(delay)
                if not context.is_active():
                    behaviour.cancelled += 1
            text = request.text
            if request.mode == "call-http":
                import meshlib

                client = behaviour.http_client or meshlib.Client()
                text = client.get(f"http://{request.text}/deadline").text
            remaining = context.time_remaining()
            return pb2.Reply(
                text=text,
                instance=behaviour.instance,
                remaining_ms=int(remaining * 1000) if remaining is not None and remaining < 1e9 else -1,
                peer=_peer(),
                trace_id=_trace_id(),
            )

        def Say(self, request: Any, context: Any) -> Any:
            return self._reply(request, context)

        def Count(self, request: Any, context: Any) -> Any:
            behaviour.calls += 1
            if behaviour.fail:
                context.abort(grpc.StatusCode.UNAVAILABLE, f"{behaviour.instance} is broken")
            for i in range(request.n):
                yield pb2.Reply(text=f"{request.text}-{i}", instance=behaviour.instance)

        def Collect(self, request_iterator: Any, context: Any) -> Any:
            texts = [r.text for r in request_iterator]
            behaviour.calls += 1
            if behaviour.fail:
                context.abort(grpc.StatusCode.UNAVAILABLE, f"{behaviour.instance} is broken")
            return pb2.Reply(text="+".join(texts), instance=behaviour.instance, peer=_peer())

        def Chat(self, request_iterator: Any, context: Any) -> Any:
            for r in request_iterator:
                yield pb2.Reply(text=r.text.upper(), instance=behaviour.instance)

    return Echo()


def make_aio_servicer(behaviour: Behaviour) -> Any:
    pb2, pb2_grpc = stubs()

    class Echo(pb2_grpc.EchoServicer):  # type: ignore[misc, name-defined]
        async def Say(self, request: Any, context: Any) -> Any:
            behaviour.calls += 1
            if behaviour.fail or request.mode == "fail":
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"{behaviour.instance} is broken")
            if request.mode == "missing":
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no {request.text}")
            delay = behaviour.delay + (request.n / 1000 if request.mode == "slow" else 0)
            if delay:
                try:
                    await asyncio.sleep(delay)
                except asyncio.CancelledError:
                    behaviour.cancelled += 1
                    raise
            remaining = context.time_remaining()
            return pb2.Reply(
                text=request.text,
                instance=behaviour.instance,
                remaining_ms=int(remaining * 1000) if remaining is not None and remaining < 1e9 else -1,
                peer=_peer(),
                trace_id=_trace_id(),
            )

        async def Count(self, request: Any, context: Any) -> Any:
            for i in range(request.n):
                yield pb2.Reply(text=f"{request.text}-{i}", instance=behaviour.instance)

        async def Collect(self, request_iterator: Any, context: Any) -> Any:
            texts = [r.text async for r in request_iterator]
            return pb2.Reply(text="+".join(texts), instance=behaviour.instance, peer=_peer())

        async def Chat(self, request_iterator: Any, context: Any) -> Any:
            async for r in request_iterator:
                yield pb2.Reply(text=r.text.upper(), instance=behaviour.instance)

    return Echo()


class GrpcUpstream:
    """An Echo instance in its own process, registered in discovery by meshlib.grpc.server."""

    def __init__(self, name: str, service: str = "echo", env: dict[str, str] | None = None, aio: bool = False):
        self.name = name
        args = [sys.executable, str(HERE / "grpc_upstream.py"), "--name", name, "--service", service]
        if aio:
            args.append("--aio")
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "MESHLIB_TEST_STUBS": str(generated_dir()), **(env or {})},
        )
        self.port = 0
        self.lines: list[str] = []

    def wait_listening(self, timeout: float = 30.0) -> GrpcUpstream:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            self.lines.append(line)
            if " listening on grpc://" in line:
                self.port = int(line.split("grpc://", 1)[1].split(",", 1)[0].rsplit(":", 1)[1])
                threading.Thread(target=self._drain, daemon=True).start()
                return self
            if not line and self.proc.poll() is not None:
                break
        raise RuntimeError(f"grpc upstream {self.name} did not start (exit {self.proc.poll()}): {''.join(self.lines)}")

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
