"""A pytest plugin that runs httpx's own test suite (from its sdist) through meshlib: ``httpx.Client`` and
``httpx.AsyncClient`` are meshlib's, and the suite's plain-HTTP test server is reached through a mesh hop (its URL
becomes ``http://httpxsuite:8000/``, a mesh name that static discovery points at the server). Loaded with
``-p mesh_hops`` by tests/test_httpx_suite.py; never imported by meshlib's own tests.

Why the URL keeps ``:8000``: a mesh hop goes to the instance discovery names, whatever port the URL says, so the
port is only in the URL for the tests that compare it (``Host`` headers, logged URLs)."""

from __future__ import annotations

import os
import sys
from typing import Any

import httpx

import meshlib
from meshlib.discovery import StaticDiscovery
from meshlib.endpoints import Endpoint

MESH_NAME = "httpxsuite"


def pytest_configure(config: Any) -> None:
    mesh = meshlib.Mesh(
        service="httpx-suite",
        discovery=StaticDiscovery({MESH_NAME: [Endpoint("127.0.0.1", 8000)]}),
        control_plane="",
    )
    meshlib.Mesh.set_default(mesh)
    config._mesh_hops = mesh
    httpx.Client = meshlib.Client  # type: ignore[misc]
    httpx.AsyncClient = meshlib.AsyncClient  # type: ignore[misc]
    import httpx._api as api

    api.Client = meshlib.Client  # type: ignore[attr-defined]
    import httpx._main as cli  # the httpx command line, whose tests print what it sent and got

    cli.Client = meshlib.Client  # type: ignore[attr-defined]


def pytest_collection_finish(session: Any) -> None:
    conftest = sys.modules.get("tests.conftest")
    if conftest is None:
        return
    server_class = conftest.TestServer
    direct = server_class.url

    def url(self: Any) -> httpx.URL:
        plain = direct.fget(self)
        if plain.scheme != "http":
            return plain  # the TLS servers stay direct: their certificates name 127.0.0.1/localhost
        return plain.copy_with(host=MESH_NAME)

    server_class.url = property(url)


def pytest_unconfigure(config: Any) -> None:
    """Write how many attempts went through the mesh hop, so the runner knows the suite really used it."""
    mesh = getattr(config, "_mesh_hops", None)
    out = os.environ.get("MESH_HOPS_REPORT")
    if mesh is None or not out:
        return
    state = mesh.services.get(MESH_NAME)
    sent = sum(h.load.sent for h in state.handles) if state is not None else 0
    with open(out, "w") as f:
        f.write(str(sent))
