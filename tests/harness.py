"""Test helpers: real upstream processes on loopback, free ports, and polling with a deadline."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

HERE = Path(__file__).resolve().parent
T = TypeVar("T")


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


def free_port() -> int:
    """A loopback port nothing listens on (for 'instance is down' endpoints)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Upstream:
    """One upstream instance in its own process (see tests/upstream.py)."""

    def __init__(self, name: str, status: int = 200, delay: float = 0.0) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "upstream.py"),
                "--name",
                name,
                "--status",
                str(status),
                "--delay",
                str(delay),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
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
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()
