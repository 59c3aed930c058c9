"""Flask and Django route templates label the server metrics under ``meshctl run`` too, where a2wsgi runs the WSGI
app under the ASGI middleware (which records the request, so the WSGI framework's route must reach it). Without it
every request was labelled by nothing, or (worse) an unbounded raw path. Real subprocesses, real requests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from harness import answers_ok, free_port, standalone_env, wait_for

pytestmark = pytest.mark.e2e  # its tests start processes

FLASK_APP = """
from flask import Flask
from meshlib.contrib.flask import FlaskMesh

app = Flask(__name__)
FlaskMesh(app)

@app.get("/items/<int:item>")
def item(item):
    return {"item": item}
"""

DJANGO_APP = """
import django
from django.conf import settings
from django.http import JsonResponse
from django.urls import path

def item(request, item):
    return JsonResponse({"item": item})

urlpatterns = [path("items/<int:item>", item)]
settings.configure(
    DEBUG=False,
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
    MIDDLEWARE=["meshlib.contrib.django.MeshMiddleware"],
    SECRET_KEY="test",
)
django.setup()
from django.core.wsgi import get_wsgi_application

app = get_wsgi_application()
"""


@pytest.mark.parametrize("framework", ["flask", "django"])
def test_wsgi_route_templates_label_the_metrics_under_meshctl_run(framework: str, tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(FLASK_APP if framework == "flask" else DJANGO_APP)
    port = free_port()
    env = standalone_env(tmp_path)
    args = [sys.executable, "-m", "meshlib.cli", "run", "items", "app:app", "--port", str(port)]
    out = tmp_path / "out.log"
    with out.open("w") as sink:
        proc = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        try:
            wait_for(
                lambda: answers_ok(f"http://127.0.0.1:{port}/items/1"),
                timeout=30,
                what=f"meshctl run {framework} to serve: {out.read_text()}",
            )
            for i in range(2, 5):
                assert httpx.get(f"http://127.0.0.1:{port}/items/{i}", timeout=5).json() == {"item": i}
            text = httpx.get(f"http://127.0.0.1:{port}/-/mesh/metrics", timeout=5).text
        finally:
            proc.terminate()
            proc.wait(20)
    counts = "http_server_request_duration_seconds_count"
    routes = {line for line in text.splitlines() if line.startswith(counts) and "http_route" in line}
    assert routes, text
    assert any('http_route="/items/<int:item>"' in line for line in routes), routes
    assert not any('http_route="/items/1"' in line or 'http_route=""' in line for line in routes), routes
