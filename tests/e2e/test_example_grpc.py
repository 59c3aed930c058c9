"""The gRPC example on a real control plane: examples/grpc_app's inventory server and client as processes, the
client's stub unchanged on ``meshlib.grpc.insecure_channel``; catalog (FastAPI) calling inventory over gRPC; the
gRPC instance's metrics read from its HTTP side port."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx

import meshlib
from harness import ROOT, free_port, wait_for
from meshlib.telemetry import signals

EXAMPLES = ROOT / "examples"


def test_inventory_server_and_client_and_catalog_over_grpc(control_plane, tmp_path):
    cp = control_plane()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update({"MESH_CONTROL_PLANE": cp.url, "MESH_STATE_DIR": str(tmp_path / "state")})
    procs = []
    try:
        for i in (1, 2):
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(EXAMPLES / "grpc_app" / "server.py")],
                    env={**env, "PORT": str(free_port()), "DEMO_INSTANCE": f"inventory-{i}"},
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "meshlib.cli", "run", "catalog", "catalog:app", "--port", str(free_port())],
                cwd=EXAMPLES / "fastapi_app",
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        wait_for(
            lambda: len(httpx.get(cp.url + "/v1/registry/services/inventory").json()["instances"]) == 2,
            timeout=60,
            what="two inventory instances",
        )
        wait_for(
            lambda: httpx.get(cp.url + "/v1/registry/services/catalog").json()["instances"], timeout=60, what="catalog"
        )

        client = subprocess.run(
            [sys.executable, str(EXAMPLES / "grpc_app" / "client.py")],
            env={**env, "MESH_SERVICE": "example-client"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert client.returncode == 0, client.stderr
        lines = client.stdout.splitlines()
        first = lines[0]  # (a protobuf map has no order)
        assert first.startswith("in stock: {") and "'1': 12" in first and "'2': 3" in first, first
        assert "(served by inventory-" in first
        assert [line.split(" (")[0] for line in lines[4:]] == [
            "update: {'2': 3}",
            "update: {'2': 2}",
            "update: {'2': 1}",
        ]

        mesh = meshlib.Mesh(service="web", control_plane=cp.url, state_dir=str(tmp_path / "web"))
        with mesh, mesh.client() as http:
            item = http.get("http://catalog/items/2").json()
            assert item["in_stock"] == 3 and item["stock_from"].startswith("inventory-")

        listed = httpx.get(cp.url + "/v1/registry/services/inventory").json()["instances"]
        assert all(i["meta"]["protocol"] == "grpc" and i["meta"]["metrics_port"].isdigit() for i in listed)
        histograms, problems = signals.scrape([{**i, "service": "inventory"} for i in listed], None)
        assert not problems
        assert histograms["inventory"].count >= 5, "the client's and catalog's calls, as the servers counted them"
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(20)
