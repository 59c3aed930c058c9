"""What the xDS tests share: a gRPC xDS client in its own process, and registering an instance of ``inventory``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from harness import ControlPlaneProcess

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


def register(cp: ControlPlaneProcess, name: str, port: int, version: str) -> str:
    """Register ``name`` as an instance of ``inventory`` with meta ``version``; its secret (deregistering needs it)."""
    body = {"id": name, "service": "inventory", "address": "127.0.0.1", "port": port, "ttl": "3600s"}
    body["meta"] = {"version": version}
    r = httpx.put(cp.url + "/v1/registry/register", json=body)
    assert r.status_code == 200, r.text
    return str(r.json()["secret"])
