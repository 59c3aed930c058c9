"""Run in a venv with ``meshlib[flask]``: the one-line Flask glue serves the app and the mesh's own endpoints."""

import importlib.util

import flask

import meshlib
import meshlib.contrib.flask

assert importlib.util.find_spec("grpc") is None and importlib.util.find_spec("django") is None

app = flask.Flask("smoke")


@app.get("/items/<name>")
def item(name: str) -> str:
    return f"item {name}"


meshlib.contrib.flask.Mesh(app, mesh=meshlib.Mesh(service="shop", discovery="static:x=127.0.0.1:1", control_plane=""))
client = app.test_client()
assert client.get("/items/a").text == "item a"
assert client.get("/-/mesh/health").status_code == 200
assert "mesh_server" in client.get("/-/mesh/metrics").text or client.get("/-/mesh/metrics").status_code == 200
print("flask smoke: ok")
