"""Run in a venv with ``meshlib[django]``: the middleware named in ``MIDDLEWARE`` serves a view and the mesh's
endpoints."""

import importlib.util

import django
from django.conf import settings
from django.http import HttpResponse
from django.urls import path

assert importlib.util.find_spec("grpc") is None and importlib.util.find_spec("flask") is None


def hello(request: object) -> HttpResponse:
    return HttpResponse(b"hello")


urlpatterns = [path("hello", hello)]
settings.configure(
    DEBUG=False,
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
    MIDDLEWARE=["meshlib.contrib.django.MeshMiddleware"],
)
django.setup()

import meshlib  # noqa: E402
from meshlib.contrib import django as mesh_django  # noqa: E402

mesh_django.MeshMiddleware.mesh = meshlib.Mesh(service="reports", discovery="static:x=127.0.0.1:1", control_plane="")
from django.test import Client  # noqa: E402

client = Client()
assert client.get("/hello").content == b"hello"
assert client.get("/-/mesh/health").status_code == 200
print("django smoke: ok")
