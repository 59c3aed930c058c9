"""The Django example on a real control plane: Django (reports) → FastAPI (catalog), both under ``meshctl run``,
called through the mesh, as the example's README says."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx

import meshlib
from harness import ROOT, free_port, wait_for

EXAMPLES = ROOT / "examples"


def test_django_reports_calls_fastapi_catalog_through_the_mesh(control_plane, tmp_path):
    cp = control_plane()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update({"MESH_CONTROL_PLANE": cp.url, "MESH_STATE_DIR": str(tmp_path / "state")})
    procs = []
    try:
        apps = (("catalog", "catalog:app", "fastapi_app"), ("reports", "reports:app", "django_app"))
        for service, app, folder in apps:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "meshlib.cli", "run", service, app, "--port", str(free_port())],
                    cwd=EXAMPLES / folder,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for service in ("catalog", "reports"):
            wait_for(
                lambda s=service: httpx.get(cp.url + f"/v1/registry/services/{s}").json()["instances"],
                timeout=60,
                what=f"{service} to register",
            )
        mesh = meshlib.Mesh(service="web", control_plane=cp.url, state_dir=str(tmp_path / "web"))
        with mesh, mesh.client() as client:
            r = client.get("http://reports/summary")
            assert r.status_code == 200, r.text
            assert r.json() == {"items": 3, "cheapest": "espresso beans", "served_by": "reports"}
            # reports counted the call (recorded once the response is sent: poll, do not race it); in plaintext the
            # caller proved no identity, so its x-mesh-caller is never a label
            wait_for(
                lambda: 'mesh_peer_service="(unverified)"' in client.get("http://reports/-/mesh/metrics").text,
                timeout=10,
                what="reports' server metrics to count the unverified caller",
            )
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(20)
