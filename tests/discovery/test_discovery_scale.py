"""A process that calls hundreds of services (a gateway, a backend-for-frontend) must keep working and keep its own
registration: one multiplexed watch on one connection and one thread, registration on a connection of its own."""

from __future__ import annotations

import os
import threading
import time

import httpx
import pytest

import meshlib
from consul_double import ConsulDouble
from harness import connections_to, wait_for
from meshlib.discovery.consul import ConsulDiscovery, ConsulRegistration
from meshlib.discovery.registry import RegistryDiscovery, RegistryRegistration

pytestmark = pytest.mark.e2e  # its tests start processes (servers, a control plane, meshctl)

SERVICES = [f"svc{i:03d}" for i in range(300)]


def meshlib_threads(ignore: frozenset[threading.Thread] = frozenset()) -> list[str]:
    """meshlib's threads, but those in ``ignore`` (other tests' meshes in this process, still winding down)."""
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("meshlib-") and t not in ignore)


@pytest.fixture
def upstream(upstreams):
    return upstreams(1)[0]


def test_one_process_calls_300_services_on_one_watch(control_plane, upstream, tmp_path):
    cp = control_plane()
    earlier = frozenset(threading.enumerate())
    with httpx.Client(base_url=cp.url) as admin:
        for name in SERVICES:
            r = admin.put(
                "/v1/registry/register",
                json={"service": name, "address": "127.0.0.1", "port": upstream.port, "ttl": "1h"},
            )
            assert r.status_code == 200
    discovery = RegistryDiscovery(cp.url, state_dir=str(tmp_path / "gw"), wait=30.0)
    mesh = meshlib.Mesh(service="gateway", discovery=discovery, control_plane="", state_dir=str(tmp_path / "gw"))
    # our own registration, with a short TTL: a heartbeat delayed behind the watches would drop us out
    own = RegistryRegistration(discovery._http, "gateway", "127.0.0.1", 9, [], {}, ttl=1.5).start()
    missing: list[float] = []
    stop = threading.Event()

    def watch_own_registration() -> None:
        with httpx.Client(base_url=cp.url) as c:
            while not stop.wait(0.1):
                if not c.get("/v1/registry/services/gateway").json()["instances"]:
                    missing.append(time.monotonic())

    watcher = threading.Thread(target=watch_own_registration, daemon=True)
    watcher.start()
    try:
        with mesh, mesh.client() as client:
            for name in SERVICES:
                r = client.get(f"http://{name}/x")
                assert r.status_code == 200 and r.json()["path"] == "/x"
            for name in SERVICES[::7]:  # and again, now all watched
                assert client.get(f"http://{name}/y").status_code == 200
            assert len(discovery.watcher.names) == 300
            assert connections_to(os.getpid(), cp.port) <= 3, "one for the watch, one for registration (and one spare)"
            ours = meshlib_threads(earlier)
            assert len([t for t in ours if "watch" in t]) == 1, ours
            assert len(ours) <= 3, ours  # watch, idle sweeper, our heartbeat

            # a change to any of the 300 reaches the process promptly (by the watch, not by a timeout)
            with httpx.Client(base_url=cp.url) as admin:
                r = admin.put(
                    "/v1/registry/register",
                    json={"id": "svc150-extra", "service": "svc150", "address": "127.0.0.2", "port": 9999, "ttl": "1h"},
                )
                assert r.status_code == 200
            started = time.monotonic()
            wait_for(
                lambda: len(mesh.service_state("svc150").handles) == 2,
                timeout=10,
                what="svc150's new instance to reach the gateway",
            )
            assert time.monotonic() - started < 5  # woken by the change, long before the 30 s wait
    finally:
        stop.set()
        watcher.join(5)
        own.close()
    assert missing == [], f"our registration was missing {len(missing)} times"


def test_300_services_on_consul_without_starvation(upstream, tmp_path):
    double = ConsulDouble()
    try:
        client = __import__("consul").Consul(port=double.port)
        for name in SERVICES:
            client.agent.service.register(name, service_id=name, address="127.0.0.1", port=upstream.port)
        discovery = ConsulDiscovery("127.0.0.1", double.port, state_dir=str(tmp_path / "gw"), wait=30.0)
        own = discovery.register("gateway", "127.0.0.1", 9)
        assert isinstance(own, ConsulRegistration)
        own.ttl = 1.5
        own.start()
        mesh = meshlib.Mesh(service="gateway", discovery=discovery, control_plane="", state_dir=str(tmp_path / "gw"))
        with mesh, mesh.client() as http:
            for name in SERVICES:
                assert http.get(f"http://{name}/x").status_code == 200
            # all 300 blocking queries are held; heartbeats still pass on their own connection
            passes = double.requests_to("/v1/agent/check/pass/")
            wait_for(
                lambda: double.requests_to("/v1/agent/check/pass/") >= passes + 3,
                timeout=10,
                what="heartbeats while 300 blocking queries are held",
            )
            assert double.check_status(own.id) == "passing"
        own.close()
    finally:
        double.stop()


def test_services_nobody_calls_stop_being_watched(control_plane, upstream, tmp_path):
    from dataclasses import replace

    cp = control_plane()
    with httpx.Client(base_url=cp.url) as admin:
        for name in ("busy", "once"):
            admin.put(
                "/v1/registry/register", json={"service": name, "address": "127.0.0.1", "port": upstream.port}
            ).raise_for_status()
    discovery = RegistryDiscovery(cp.url, state_dir=str(tmp_path / "gw"), wait=30.0)
    settings = replace(meshlib.MeshSettings.from_env(service="gateway", control_plane=""), watch_idle_timeout=0.5)
    with meshlib.Mesh(discovery=discovery, settings=settings) as mesh, mesh.client() as client:
        assert client.get("http://once/x").status_code == 200
        assert client.get("http://busy/x").status_code == 200
        assert discovery.watcher.names == {"busy", "once"}

        def once_dropped() -> bool:
            client.get("http://busy/x")  # busy keeps being called
            return "once" not in discovery.watcher.names

        wait_for(once_dropped, timeout=15, interval=0.1, what="the unused service to stop being watched")
        assert "busy" in discovery.watcher.names and set(mesh.services) == {"busy"}
        assert client.get("http://once/x").status_code == 200  # called again: watched again
        assert discovery.watcher.names == {"busy", "once"}
