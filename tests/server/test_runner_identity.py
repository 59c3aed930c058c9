"""Under a runner the program is the runner: ``gunicorn shopfront:app`` called itself ``gunicorn`` (its metrics, its
certificate, its health answer) unless MESH_SERVICE was set. The name now comes from the app the runner was given:
real gunicorn and uvicorn processes check it (tests/test_appname.py has the command lines people type)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from harness import answers_ok, free_port, standalone_env, wait_for

pytestmark = pytest.mark.e2e  # its tests start processes

BIN = Path(sys.executable).parent


FLASK_APP = """
from flask import Flask
from meshlib.contrib.flask import Mesh

app = Flask(__name__)
Mesh(app)

@app.get("/")
def home():
    return "ok"
"""

FASTAPI_APP = """
from fastapi import FastAPI
from meshlib.contrib.fastapi import MeshMiddleware

app = FastAPI()
app.add_middleware(MeshMiddleware)

@app.get("/")
def home():
    return "ok"
"""


def _health_service(tmp_path: Path, module: str, source: str, args: list[str], cwd: Path) -> tuple[str, str]:
    (tmp_path / f"{module}.py").write_text(source)
    env = standalone_env(tmp_path)
    out = tmp_path / "out.log"
    url = args[-1]
    with out.open("w") as sink:
        proc = subprocess.Popen(args[:-1], stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        try:
            wait_for(lambda: answers_ok(url), timeout=30, what=f"the runner to serve: {out.read_text()}")
            service = str(httpx.get(url, timeout=5).json()["service"])
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return service, out.read_text()


@pytest.mark.timeout(90)
def test_gunicorn_serves_as_the_app(tmp_path: Path) -> None:
    pytest.importorskip("gunicorn", reason="the [gunicorn] extra is not installed")
    port = free_port()
    args = [str(BIN / "gunicorn"), "-w", "1", "-b", f"127.0.0.1:{port}", "shopfront:app"]
    health = f"http://127.0.0.1:{port}/-/mesh/health"
    service, log = _health_service(tmp_path, "shopfront", FLASK_APP, [*args, health], tmp_path)
    assert service == "shopfront"
    assert "service name 'shopfront' guessed from the command line; set MESH_SERVICE" in log  # said, not silent


@pytest.mark.timeout(90)
def test_uvicorn_serves_as_the_app(tmp_path: Path) -> None:
    port = free_port()
    args = [sys.executable, "-m", "uvicorn", "--port", str(port), "orders:app"]
    health = f"http://127.0.0.1:{port}/-/mesh/health"
    service, _ = _health_service(tmp_path, "orders", FASTAPI_APP, [*args, health], tmp_path)
    assert service == "orders"
