"""One line for Flask, Django and FastAPI, each on a real server with real mTLS: identity, authorization,
deadline and trace propagation into outbound calls, metrics by route template, health."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import meshlib
from harness import ThreadedServer, wait_for
from meshlib.discovery import StaticDiscovery
from meshlib.endpoints import Endpoint

pytestmark = pytest.mark.e2e  # its tests start processes (servers, a control plane, meshctl)

BOOTSTRAP = "framework-bootstrap"
TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
COUNTS: dict[str, int] = {"work": 0}


def echo_app() -> Starlette:
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"headers": dict(request.headers)})

    return Starlette(routes=[Route("/echo", echo)])


@pytest.fixture
def world(control_plane, tmp_path, monkeypatch):
    """A control plane (with its CA), an echo service `beta` on strict mTLS, and a way to make meshes."""
    from meshlib.server import mesh_uvicorn_config

    monkeypatch.setenv("MESH_BOOTSTRAP_TOKEN", BOOTSTRAP)
    cp = control_plane(tmp_path / "cp", bootstrap_token=BOOTSTRAP)
    endpoints: dict[str, list[Endpoint]] = {}

    def mesh(service: str, services: dict[str, list[Endpoint]] | None = None) -> meshlib.Mesh:
        return meshlib.Mesh(
            service=service,
            discovery=StaticDiscovery({**endpoints, **(services or {})}),
            control_plane=cp.url,
            tls="strict",
            state_dir=str(tmp_path / service),
        )

    beta_mesh = mesh("beta")
    beta = ThreadedServer(None, config_object=mesh_uvicorn_config(echo_app(), beta_mesh, log_level="warning"))
    wait_for(lambda: beta.server.started, what="beta on mTLS")
    endpoints["beta"] = [Endpoint("127.0.0.1", beta.port, meta={"mesh_tls": "strict"})]
    yield cp, mesh
    beta.stop()
    beta_mesh.close()


def outbound_view_result(server_mesh: meshlib.Mesh) -> dict[str, object]:
    """What every framework's view does: call `beta` through the mesh, report what it saw."""
    from meshlib.inbound import peer_identity

    COUNTS["work"] += 1
    with server_mesh.client() as client:
        seen = client.get("http://beta/echo").json()["headers"]
    peer = peer_identity.get()
    return {
        "peer": peer.uri if peer else None,
        "deadline": seen.get("x-mesh-deadline"),
        "traceparent": seen.get("traceparent"),
    }


def check_framework(cp, mesh, server_mesh: meshlib.Mesh, port: int, route: str) -> None:
    v = cp.apply({"services": {"app": {"authorization": {"mode": "strict", "allow": ["frontend"]}}}})
    assert server_mesh.rules_watcher is not None and server_mesh.rules_watcher.wait_for_version(v, 5)
    target = {"app": [Endpoint("127.0.0.1", port)]}
    frontend, billing = mesh("frontend", target), mesh("billing", target)
    with frontend, billing, frontend.client() as fc, billing.client() as bc:
        from meshlib.propagation import incoming_deadline

        deadline = time.time() + 2  # as if this test were a handler with 2 s left: the whole chain inherits it
        token = incoming_deadline.set(deadline)
        try:
            r = fc.get("http://app/work", headers={"traceparent": TRACE})
        finally:
            incoming_deadline.reset(token)
        deadline_ms = int(deadline * 1000)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["peer"] == "spiffe://mesh.local/ns/default/sa/frontend"  # identity from the certificate
        # the incoming deadline reached beta two hops away, unchanged (±20 ms: wall and monotonic clocks are read
        # separately at each hop); its own timeout would have given a later one
        assert abs(int(body["deadline"]) - deadline_ms) <= 20, (body["deadline"], deadline_ms)
        assert body["traceparent"].split("-")[1] == TRACE.split("-")[1]  # one trace across the hop

        before = COUNTS["work"]
        denied = bc.get("http://app/work")
        assert denied.status_code == 403 and "billing" in denied.json()["reason"]
        assert COUNTS["work"] == before  # the view never ran

        assert frontend.identity is not None
        with httpx.Client(verify=frontend.identity.client, timeout=5) as raw:  # frontend's own certificate
            late = raw.get(
                f"https://127.0.0.1:{port}/work",
                headers={"x-mesh-deadline": str(int((time.time() - 1) * 1000))},
                extensions={"sni_hostname": "app.default.mesh"},
            )
            assert late.status_code == 504 and COUNTS["work"] == before
            bad = raw.get(
                f"https://127.0.0.1:{port}/work",
                headers={"x-mesh-deadline": "soon"},
                extensions={"sni_hostname": "app.default.mesh"},
            )
            assert bad.status_code == 400 and "x-mesh-deadline" in bad.json()["error"]

        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectError)):  # no client cert
            httpx.get(f"https://127.0.0.1:{port}/work", verify=False, timeout=5)
        assert fc.get("http://app/-/mesh/health").json()["status"] == "ok"  # refused, not down
        metrics = fc.get("http://app/-/mesh/metrics").text
        assert f'http_route="{route}"' in metrics and 'mesh_peer_service="frontend"' in metrics
        assert "mesh_server_authz_denied_total" in metrics


def werkzeug_server(app, ctx) -> tuple[object, int]:
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True, ssl_context=ctx)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_port


def test_flask_one_line(world):
    from flask import Flask, jsonify

    from meshlib.contrib.flask import Mesh as FlaskMesh

    cp, mesh = world
    server_mesh = mesh("app")
    app = Flask("app")
    FlaskMesh(app, mesh=server_mesh)

    @app.get("/work")
    def work():  # type: ignore[no-untyped-def]
        return jsonify(outbound_view_result(server_mesh))

    assert server_mesh.identity is not None
    server, port = werkzeug_server(app, server_mesh.identity.server_strict)
    try:
        check_framework(cp, mesh, server_mesh, port, "/work")
    finally:
        server.shutdown()  # type: ignore[attr-defined]
        server_mesh.close()


def test_django_one_line(world):
    import django
    from django.conf import settings

    cp, mesh = world
    server_mesh = mesh("app")
    if not settings.configured:
        settings.configure(
            DEBUG=False,
            ALLOWED_HOSTS=["*"],
            ROOT_URLCONF=__name__,
            MIDDLEWARE=["meshlib.contrib.django.MeshMiddleware"],
            SECRET_KEY="test",
        )
        django.setup()
    from django.core.wsgi import get_wsgi_application

    from meshlib.contrib.django import MeshMiddleware

    MeshMiddleware.mesh = server_mesh
    global _server_mesh
    _server_mesh = server_mesh
    assert server_mesh.identity is not None
    server, port = werkzeug_server(get_wsgi_application(), server_mesh.identity.server_strict)
    try:
        check_framework(cp, mesh, server_mesh, port, "/work")
    finally:
        server.shutdown()  # type: ignore[attr-defined]
        MeshMiddleware.mesh = None
        server_mesh.close()


_server_mesh: meshlib.Mesh | None = None


def _django_work(request):  # type: ignore[no-untyped-def]
    from django.http import JsonResponse

    assert _server_mesh is not None
    return JsonResponse(outbound_view_result(_server_mesh))


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    if name == "urlpatterns":  # Django's ROOT_URLCONF is this module
        from django.urls import path

        return [path("work", _django_work)]
    raise AttributeError(name)


def test_fastapi_one_line(world):
    from fastapi import FastAPI

    from meshlib.contrib.fastapi import MeshMiddleware
    from meshlib.server import mesh_uvicorn_config

    cp, mesh = world
    server_mesh = mesh("app")
    app = FastAPI()
    app.add_middleware(MeshMiddleware, mesh=server_mesh)

    @app.get("/work")
    def work() -> dict[str, object]:
        return outbound_view_result(server_mesh)

    config = mesh_uvicorn_config(app, server_mesh, log_level="warning", lifespan="off")
    server = ThreadedServer(None, config_object=config)
    try:
        wait_for(lambda: server.server.started, what="uvicorn")
        check_framework(cp, mesh, server_mesh, server.port, "/work")
    finally:
        server.stop()
        server_mesh.close()
