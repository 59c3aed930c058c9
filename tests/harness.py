"""Test helpers: real upstream processes on loopback, free ports, and polling with a deadline."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

HERE = Path(__file__).resolve().parent
T = TypeVar("T")


#: the tests/ folder and the repository root
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def wait_for(condition: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> T:
    """Poll ``condition`` until it returns something truthy; fail with ``what`` once ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


def answers_ok(url: str) -> bool:
    """Whether ``url`` answers 200 now: the condition to wait for while a server process starts."""
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def standalone_env(app_dir: Path, **mesh: str) -> dict[str, str]:
    """The environment of an app process that meshes alone: none of this process's ``MESH_*`` settings, no control
    plane, static discovery of nothing it calls, its state under ``app_dir``, which is also on its ``PYTHONPATH``;
    ``mesh`` adds settings (``MESH_ACCESS_LOG="on"``)."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("MESH_")},
        "MESH_DISCOVERY": "static:other=127.0.0.1:1",
        "MESH_CONTROL_PLANE": "",
        "MESH_STATE_DIR": str(app_dir / "state"),
        "PYTHONPATH": str(app_dir),
        **mesh,
    }


def rss_mb(pid: int) -> float:
    """A process's resident memory now, in MiB (from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def free_port() -> int:
    """A loopback port nothing listens on (for 'instance is down' endpoints)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Upstream:
    """One upstream instance in its own process (see tests/upstream.py)."""

    def __init__(
        self,
        name: str,
        status: int = 200,
        delay: float = 0.0,
        mesh_service: str | None = None,
        tags: str = "",
        env: dict[str, str] | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        args = [sys.executable, str(HERE / "upstream.py"), "--name", name, "--status", str(status)]
        args += ["--delay", str(delay), *extra_args]
        if mesh_service:
            args += ["--mesh-service", mesh_service, "--tags", tags]
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.port = 0

    def wait_listening(self, timeout: float = 20.0) -> Upstream:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("LISTENING"):
                self.port = int(line.split()[1])
                return self
            if not line and self.proc.poll() is not None:
                break
        raise RuntimeError(f"upstream {self.name} did not start (exit {self.proc.poll()})")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def admin(self, path: str, **params: Any) -> Any:
        return httpx.get(self.url + path, params=params, timeout=5).json()

    def behave(self, **params: Any) -> None:
        self.admin("/-/behave", **params)

    def counts(self) -> dict[str, int]:
        return dict(self.admin("/-/count"))

    def hits(self, method: str = "GET") -> int:
        return int(self.counts().get(method, 0))

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def served_instance(
    cp: Any, state_dir: Path, *, header_timeout: float | None = None, env: dict[str, str] | None = None
) -> Upstream:
    """A ``meshlib.serve`` instance (tests/upstream.py) named ``served``, registered with the control plane ``cp``."""
    full = {
        "MESH_CONTROL_PLANE": cp.url,
        "MESH_DISCOVERY": f"registry://127.0.0.1:{cp.port}",
        "MESH_STATE_DIR": str(state_dir),
        **(env or {}),
    }
    extra = ("--header-timeout", str(header_timeout)) if header_timeout is not None else ()
    return Upstream("served", mesh_service="served", env=full, extra_args=extra).wait_listening()


def startup_lines(env: dict[str, str], state_dir: Path, *args: str) -> str:
    """What ``meshctl serve`` (on a free port, with exactly ``env``) writes to stderr before it listens."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshlib.cli", "serve", "--port", "0", "--state-dir", str(state_dir), *args],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stderr is not None
        stderr = proc.stderr
        lines: list[str] = []
        wait_for(
            lambda: lines.append(stderr.readline()) or "listening on" in lines[-1],
            timeout=30,
            what="meshctl serve to start",
        )
        return "".join(lines)
    finally:
        proc.terminate()
        proc.wait(10)


ADMIN_TOKEN = "test-admin-token"


class ControlPlaneProcess:
    """A real ``meshctl serve`` subprocess on a free loopback port."""

    def __init__(
        self,
        state_dir: Path,
        port: int = 0,
        admin_token: str | None = ADMIN_TOKEN,
        bootstrap_token: str | None = None,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("MESH_")}, **(env or {})}
        if admin_token:
            env["MESH_ADMIN_TOKEN"] = admin_token
        if bootstrap_token:
            env["MESH_BOOTSTRAP_TOKEN"] = bootstrap_token
        self.bootstrap_token = bootstrap_token
        self.state_dir = state_dir
        self.admin_token = admin_token
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meshlib.cli",
                "serve",
                "--port",
                str(port),
                "--state-dir",
                str(state_dir),
                "--log-level",
                "warning",
                *extra_args,
            ],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 30
        self.port = 0
        self.scheme = "http"
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if "listening on http" in line:
                url = line.split("listening on ", 1)[1].split()[0]
                self.scheme = url.split("://", 1)[0]
                self.port = int(url.rsplit(":", 1)[1])
                break
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"meshctl serve exited with {self.proc.returncode}")
        if not self.port:
            raise RuntimeError("meshctl serve did not start")
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"
        self.verify: Any = (
            ssl.create_default_context(cafile=str(state_dir / "ca-roots.pem")) if self.scheme == "https" else True
        )
        wait_for(self._healthy, timeout=20, what="control plane /healthz")

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/healthz", timeout=1, verify=self.verify).status_code == 200
        except httpx.HTTPError:
            return False

    def admin(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.admin_token}"}

    def put_rules(self, document: Any, cas: int | None = None) -> httpx.Response:
        import json as _json

        params = {"cas": cas} if cas is not None else {}
        return httpx.put(self.url + "/v1/rules", params=params, content=_json.dumps(document), headers=self.admin())

    def apply(self, document: Any) -> int:
        r = self.put_rules(document)
        assert r.status_code == 200, r.text
        return int(r.json()["version"])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class ThreadedServer:
    """An ASGI app on a real uvicorn server in a background thread of the test process (for tests that need to
    share in-memory telemetry exporters with the servers)."""

    def __init__(self, app: Any, config_object: Any = None, loop_factory: Any = None, **config: Any) -> None:
        import asyncio
        import threading

        import uvicorn

        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.server = uvicorn.Server(
            config_object or uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", **config)
        )
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]

        def run() -> None:
            with asyncio.Runner(loop_factory=loop_factory) as runner:
                runner.run(self.server.serve(sockets=[self.sock]))

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, timeout=20, what="the in-process server to start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def connections_to(pid: int, port: int) -> int:
    """Established TCP connections from process ``pid`` to ``port`` on this machine (read from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == "01" and fields[9] in inodes:
                count += 1  # state 01: ESTABLISHED
    return count
