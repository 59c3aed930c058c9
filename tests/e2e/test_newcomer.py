"""The newcomer's path (first points): one variable moves the control plane and its registry, and a plaintext
caller of an mTLS-only service is told what to set."""

from __future__ import annotations

import httpx
import pytest

import meshlib


def write_tiny_app(folder) -> None:  # type: ignore[no-untyped-def]
    """A minimal ASGI app module, ``tinyapp:app``, for ``meshctl run``."""
    (folder / "tinyapp.py").write_text(
        "async def app(scope, receive, send):\n"
        "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
        "    await send({'type': 'http.response.body', 'body': b'ok'})\n"
    )


def test_moving_the_control_plane_needs_one_variable(control_plane, upstreams, monkeypatch):
    cp = control_plane()
    (up,) = upstreams(1)
    r = httpx.put(
        cp.url + "/v1/registry/register", json={"service": "payments", "address": "127.0.0.1", "port": up.port}
    )
    assert r.status_code == 200
    monkeypatch.setenv("MESH_CONTROL_PLANE", cp.url)  # and no MESH_DISCOVERY: its registry is the default
    monkeypatch.setenv("MESH_SERVICE", "frontend")
    settings = meshlib.MeshSettings.from_env()
    assert settings.discovery == f"registry://127.0.0.1:{cp.port}"
    with meshlib.Client() as client:
        assert client.get("http://payments/x").json()["instance"] == up.name
    meshlib.Mesh.default().close()


def test_a_plaintext_caller_of_an_mtls_only_service_is_told_what_to_set(control_plane, upstreams, tmp_path):
    cp = control_plane()
    (up,) = upstreams(1)
    r = httpx.put(
        cp.url + "/v1/registry/register",
        json={"service": "payments", "address": "127.0.0.1", "port": up.port, "meta": {"mesh_tls": "strict"}},
    )
    assert r.status_code == 200
    mesh = meshlib.Mesh(service="frontend", control_plane=cp.url, tls="off", state_dir=str(tmp_path / "f"))
    with mesh, mesh.client() as client, pytest.raises(meshlib.NoEndpointsError) as info:
        client.get("http://payments/x")
    assert "payments requires mTLS; set MESH_TLS=strict or permissive" in str(info.value)
    assert up.counts() == {}  # not even a connection attempt that would end in "Server disconnected"


def test_caches_from_another_registry_are_not_restored(control_plane, upstreams, tmp_path):
    """Endpoints and rules saved while talking to one mesh must not be served when the process now points at
    another one that is down."""
    from harness import free_port

    cp = control_plane()
    (up,) = upstreams(1)
    httpx.put(
        cp.url + "/v1/registry/register", json={"service": "payments", "address": "127.0.0.1", "port": up.port}
    ).raise_for_status()
    v = cp.apply({"services": {"payments": {"timeout": "2s"}}})
    state = str(tmp_path / "shared-state")
    first = meshlib.Mesh(service="frontend", control_plane=cp.url, state_dir=state)
    with first, first.client() as client:
        assert client.get("http://payments/x").status_code == 200
        assert first.rules_watcher is not None and first.rules_watcher.wait_for_version(v, 5)
    elsewhere = f"http://127.0.0.1:{free_port()}"  # another mesh's control plane, down
    second = meshlib.Mesh(service="frontend", control_plane=elsewhere, state_dir=state)
    assert second.settings.discovery == "registry://" + elsewhere.split("://")[1]  # that mesh's registry
    with second, second.client() as client, pytest.raises(meshlib.NoEndpointsError):
        client.get("http://payments/x")
    assert second.rules.version == 0  # not the other mesh's version
    again = meshlib.Mesh(service="frontend", control_plane=cp.url, state_dir=state)
    cp.kill()  # the first mesh's control plane goes down: its own cache is still restored
    with again, again.client() as client:
        assert again.rules.version == v
        assert client.get("http://payments/x").status_code == 200


def test_contrib_is_reachable_from_import_meshlib():
    import subprocess
    import sys

    code = "import sys, meshlib; assert 'django' not in sys.modules; print(meshlib.contrib.flask.Mesh.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "FlaskMesh"  # meshlib.contrib.flask.Mesh, the documented spelling


@pytest.mark.parametrize(("token", "said"), [(None, "no token sent"), ("wrong", "wrong token")])
def test_a_missing_or_wrong_bootstrap_token_fails_fast_in_one_line(control_plane, tmp_path, monkeypatch, token, said):
    import os
    import subprocess
    import sys
    import time

    cp = control_plane(bootstrap_token="the-real-token")
    write_tiny_app(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update({"MESH_CONTROL_PLANE": cp.url, "MESH_STATE_DIR": str(tmp_path / "s"), "PYTHONPATH": str(tmp_path)})
    if token:
        env["MESH_BOOTSTRAP_TOKEN"] = token
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "meshlib.cli", "run", "tiny", "tinyapp:app", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 1, run.stderr
    assert time.monotonic() - started < 30  # refused at once, not retried
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("meshctl: registry at ") and cp.url in last, run.stderr
    assert said in last and "MESH_BOOTSTRAP_TOKEN" in last, last
    assert "Traceback" not in run.stderr and "developer.mozilla" not in run.stderr

    # strict mTLS: the certificate request is refused at once too, naming the variable, not retried for ~30 s
    if token:
        monkeypatch.setenv("MESH_BOOTSTRAP_TOKEN", token)
    started = time.monotonic()
    with pytest.raises(meshlib.MeshError) as info:
        meshlib.Mesh(service="tiny", control_plane=cp.url, tls="strict", state_dir=str(tmp_path / "strict"))
    assert time.monotonic() - started < 10
    assert said in str(info.value) and "MESH_BOOTSTRAP_TOKEN" in str(info.value) and cp.url in str(info.value)


def test_serve_names_the_process_even_when_clients_were_made_at_import(control_plane, upstreams, tmp_path):
    """``client = meshlib.Client()`` at import, then ``meshlib.serve(app, service="web2")``: the client's calls
    go out as web2 (they used to go out under the program name, ``app``)."""
    import os
    import subprocess
    import sys

    from harness import free_port, wait_for

    cp = control_plane()
    (peer,) = upstreams(1)
    httpx.put(
        cp.url + "/v1/registry/register", json={"service": "peer", "address": "127.0.0.1", "port": peer.port}
    ).raise_for_status()
    port = free_port()
    (tmp_path / "app.py").write_text(
        "import meshlib\n"
        "client = meshlib.Client()\n"
        "def app(environ, start_response):\n"
        "    seen = client.get('http://peer/x').json()['headers'].get('x-mesh-caller', '')\n"
        "    start_response('200 OK', [('content-type', 'text/plain')])\n"
        "    return [seen.encode()]\n"
        f"meshlib.serve(app, service='web2', port={port})\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update({"MESH_CONTROL_PLANE": cp.url, "MESH_STATE_DIR": str(tmp_path / "s")})
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "app.py")],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: httpx.get(cp.url + "/v1/registry/services/web2").json()["instances"],
            timeout=30,
            what="web2 to register",
        )
        assert httpx.get(f"http://127.0.0.1:{port}/").text == "web2"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert "guessed from the command line" not in err


def test_unknown_services_get_a_suggestion_and_a_reason(control_plane, upstreams, tmp_path):
    cp = control_plane()
    (up,) = upstreams(1)
    secrets = {}
    for name in ("inventory", "gone"):
        r = httpx.put(
            cp.url + "/v1/registry/register",
            json={"id": name, "service": name, "address": "127.0.0.1", "port": up.port},
        )
        secrets[name] = r.json()["secret"]
    mesh = meshlib.Mesh(service="shop", control_plane=cp.url, state_dir=str(tmp_path / "shop"))
    with mesh, mesh.client() as client:
        with pytest.raises(meshlib.NoEndpointsError) as typo:
            client.get("http://inventroy/items")
        message = str(typo.value)
        assert f"registry at http://127.0.0.1:{cp.port}" in message
        assert "inventroy was never registered" in message and "did you mean inventory?" in message
        assert client.get("http://gone/x").status_code == 200
    httpx.delete(cp.url + "/v1/registry/gone", headers={"x-mesh-instance-secret": secrets["gone"]}).raise_for_status()
    mesh = meshlib.Mesh(service="shop", control_plane=cp.url, state_dir=str(tmp_path / "shop2"))
    with mesh, mesh.client() as client, pytest.raises(meshlib.NoEndpointsError) as gone:
        client.get("http://gone/x")
    assert "gone was registered, but none of its instances is there now" in str(gone.value)


def test_cli_rough_edges(control_plane, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from harness import wait_for

    cp = control_plane()
    write_tiny_app(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update({"MESH_CONTROL_PLANE": cp.url, "MESH_STATE_DIR": str(tmp_path / "s"), "PYTHONPATH": str(tmp_path)})
    # a port in use: one line and exit 1, not an OSError traceback
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = subprocess.run(
            [sys.executable, "-m", "meshlib.cli", "run", "tiny", "tinyapp:app", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=tmp_path,
        )
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert f"meshctl: cannot listen on 127.0.0.1:{port} for tiny" in run.stderr
    # listening and registered: one line that says so
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshlib.cli", "run", "tiny", "tinyapp:app", "--port", "0"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines: list[str] = []
        assert proc.stderr is not None
        wait_for(
            lambda: lines.append(proc.stderr.readline()) or "listening on" in lines[-1],
            timeout=30,
            what="the listening line",
        )
        line = lines[-1]
        assert line.startswith("meshlib: tiny listening on http://127.0.0.1:") and "MESH_TLS=off" in line
        assert "registered as tiny-127.0.0.1-" in line and f"registry at http://127.0.0.1:{cp.port}" in line
    finally:
        proc.terminate()
        proc.wait(20)
    # meshctl status says how to read strict instances
    httpx.put(
        cp.url + "/v1/registry/register",
        json={"service": "vault", "address": "127.0.0.1", "port": 9, "meta": {"mesh_tls": "strict"}},
    ).raise_for_status()
    status = subprocess.run(
        [sys.executable, "-m", "meshlib.cli", "--control-plane", cp.url, "status", "--interval", "0.1"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert "set MESH_BOOTSTRAP_TOKEN so meshctl gets an identity" in status.stderr
    # the typed API
    import inspect

    import meshlib.server

    assert "port" in inspect.signature(meshlib.server.serve).parameters
    assert meshlib.IdentityError.__module__ == "meshlib.errors"


def test_routing_headers_cross_hops_with_mesh_propagate_headers(upstreams, monkeypatch):
    """x-canary reaches the edge only; with MESH_PROPAGATE_HEADERS the next hop's calls carry it, from the handler
    itself, from an asyncio task it starts and from a thread it starts, and routing there sees it."""
    import asyncio

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from harness import ThreadedServer
    from meshlib.contrib.asgi import MeshMiddleware
    from meshlib.discovery import StaticDiscovery
    from meshlib.endpoints import Endpoint
    from meshlib.rules.model import validate_rules

    v1, v2 = upstreams(2)
    monkeypatch.setenv("MESH_PROPAGATE_HEADERS", "X-Canary, x-user-id")
    backend = StaticDiscovery(
        {
            "backend": [
                Endpoint("127.0.0.1", v1.port, frozenset({"v1"})),
                Endpoint("127.0.0.1", v2.port, frozenset({"v2"})),
            ]
        }
    )
    front = meshlib.Mesh(service="front", discovery=backend, control_plane="")
    front.apply_rules(
        validate_rules(
            {
                "services": {
                    "backend": {
                        "subsets": {"v1": {"tags": ["v1"]}, "v2": {"tags": ["v2"]}},
                        "routes": [
                            {"match": {"headers": {"x-canary": "yes"}}, "to": [{"subset": "v2"}]},
                            {"to": [{"subset": "v1"}]},
                        ],
                    }
                }
            },
            1,
        )
    )
    client = front.async_client()

    async def handler(request: Request) -> JSONResponse:
        async def call() -> dict[str, str]:
            answer = (await client.get("http://backend/x")).json()
            return {"instance": answer["instance"], "canary": answer["headers"].get("x-canary", "")}

        direct = await call()
        in_task = await asyncio.create_task(call())
        in_thread = await asyncio.to_thread(lambda: asyncio.run(_sync_call(front)))
        return JSONResponse({"direct": direct, "task": in_task, "thread": in_thread})

    server = ThreadedServer(MeshMiddleware(Starlette(routes=[Route("/front", handler)]), front))
    try:
        seen = httpx.get(server.url + "/front", headers={"x-canary": "yes", "x-user-id": "u7"}, timeout=10).json()
        for where in ("direct", "task", "thread"):
            assert seen[where] == {"instance": v2.name, "canary": "yes"}, (where, seen)
        plain = httpx.get(server.url + "/front", timeout=10).json()
        assert plain["direct"] == {"instance": v1.name, "canary": ""}  # nothing to carry: nothing carried
    finally:
        server.stop()
        front.close()


async def _sync_call(mesh: meshlib.Mesh) -> dict[str, str]:
    with mesh.client() as c:
        answer = c.get("http://backend/x").json()
    return {"instance": answer["instance"], "canary": answer["headers"].get("x-canary", "")}


def test_propagate_headers_setting_is_validated():
    with pytest.raises(meshlib.ConfigurationError, match="MESH_PROPAGATE_HEADERS"):
        meshlib.MeshSettings.from_env({"MESH_PROPAGATE_HEADERS": "x-canary, bad header"})
