"""A Django project's ALLOWED_HOSTS lists its own addresses, not the mesh name its callers use (``Host: reports``):
Django answered 400 DisallowedHost to every mesh call. The middleware adds the service's name, and only that. A real
Django project (CommonMiddleware, which checks the host) in a real ``meshctl run`` subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from harness import answers_ok, free_port, standalone_env, wait_for

pytestmark = pytest.mark.e2e  # its tests start processes

DJANGO_APP = """
import django
from django.conf import settings
from django.http import JsonResponse
from django.urls import path

def summary(request):
    return JsonResponse({"host": request.get_host()})

urlpatterns = [path("summary", summary)]
settings.configure(
    DEBUG=False,
    ALLOWED_HOSTS=["127.0.0.1", "localhost"],
    ROOT_URLCONF=__name__,
    MIDDLEWARE=["meshlib.contrib.django.MeshMiddleware", "django.middleware.common.CommonMiddleware"],
    SECRET_KEY="test",
)
django.setup()
from django.core.wsgi import get_wsgi_application

app = get_wsgi_application()
"""


def test_mesh_calls_by_service_name_pass_allowed_hosts(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(DJANGO_APP)
    port = free_port()
    env = standalone_env(tmp_path)
    args = [sys.executable, "-m", "meshlib.cli", "run", "reports", "app:app", "--port", str(port)]
    out = tmp_path / "out.log"
    url = f"http://127.0.0.1:{port}/summary"
    with out.open("w") as sink:
        proc = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        try:
            wait_for(lambda: answers_ok(url), timeout=30, what=f"meshctl run to serve: {out.read_text()}")
            mesh_call = httpx.get(url, headers={"host": "reports"}, timeout=5)  # what meshlib's client sends
            assert mesh_call.status_code == 200, mesh_call.text
            assert mesh_call.json() == {"host": "reports"}
            other = httpx.get(url, headers={"host": "evil.example"}, timeout=5)
            assert other.status_code == 400  # the project's own list still holds for every other name
        finally:
            proc.terminate()
            proc.wait(15)


DEBUG_CHECK = """
from django.conf import settings
from meshlib.contrib.django import allow_mesh_host

settings.configure(DEBUG=True, ALLOWED_HOSTS=[])
allow_mesh_host("reports")
allow_mesh_host("reports")
first = list(settings.ALLOWED_HOSTS)
settings.ALLOWED_HOSTS = ["*"]
allow_mesh_host("reports")
print(first, settings.ALLOWED_HOSTS)
"""


def test_an_empty_list_under_debug_keeps_djangos_local_hosts() -> None:
    """Django reads an empty list under DEBUG as its local hosts; a list with only the name would end that. Its own
    process: Django's settings are configured once per process."""
    done = subprocess.run([sys.executable, "-c", DEBUG_CHECK], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['.localhost', '127.0.0.1', '[::1]', 'reports'] ['*']"
