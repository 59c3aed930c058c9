"""``MESH_ACCESS_LOG=on`` prints one JSON line per request under every runner: ``meshctl run`` and plain uvicorn
(which configure their own loggers, never ``meshlib.access``, and leave Python's default WARNING level that drops
INFO records). Real subprocesses, real requests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from harness import answers_ok, free_port, standalone_env, wait_for

pytestmark = pytest.mark.e2e  # its tests start processes

APP = """
import meshlib
from meshlib.contrib.asgi import MeshMiddleware

async def plain(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})

app = plain
wrapped = MeshMiddleware(plain)
"""


def _lines(path: Path) -> list[dict[str, object]]:
    found = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            found.append(json.loads(line))
    return found


@pytest.mark.parametrize("runner", ["meshctl run", "uvicorn"])
def test_the_access_log_prints_under_every_runner(runner: str, tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(APP)
    port = free_port()
    env = standalone_env(tmp_path, MESH_ACCESS_LOG="on", MESH_SERVICE="logged")
    if runner == "meshctl run":
        args = [sys.executable, "-m", "meshlib.cli", "run", "logged", "app:app", "--port", str(port)]
    else:
        args = [sys.executable, "-m", "uvicorn", "app:wrapped", "--port", str(port), "--log-level", "warning"]
    out = tmp_path / "out.log"
    with out.open("w") as sink:
        proc = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        try:
            wait_for(lambda: answers_ok(f"http://127.0.0.1:{port}/hello/1"), timeout=30, what=f"{runner} to serve")
            for i in range(4):
                assert httpx.get(f"http://127.0.0.1:{port}/hello/{i + 2}", timeout=5).status_code == 200
            wait_for(lambda: len(_lines(out)) >= 5, timeout=10, what=f"five access log lines: {out.read_text()}")
        finally:
            proc.terminate()
            proc.wait(20)
    lines = _lines(out)
    assert {line["path"] for line in lines} >= {f"/hello/{i}" for i in range(1, 6)}
    assert all(line["kind"] == "server" and line["status"] == 200 for line in lines)
    assert all(line["destination"] == "logged" for line in lines)
