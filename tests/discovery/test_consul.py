"""Consul discovery, registration and the Consul KV rules store.

The contract tests run against ``consul_double.ConsulDouble`` (no Consul server can be installed on these machines)
and, when ``CONSUL_HTTP_ADDR`` points at a real agent, against that agent too: the same assertions, parametrised.
Fault tests (500s, index resets, hangs, ACL filtering, the agent going down) need the double's switches.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import consul
import pytest

import meshlib
from consul_double import ConsulDouble
from harness import ControlPlaneProcess, Upstream, wait_for
from meshlib.control.consul_store import ConsulRulesStore
from meshlib.control.rules_writes import ResourceConflict, resource_history, write_resources
from meshlib.control.store import CasConflict, SQLiteRulesStore
from meshlib.discovery.consul import ConsulDiscovery, ConsulRegistration, _endpoints

pytestmark = pytest.mark.e2e  # its tests start processes (servers, a control plane, meshctl)

REAL = os.environ.get("CONSUL_HTTP_ADDR")


class Backend:
    """Where the contract tests run: the double, or a real agent."""

    def __init__(self, double: ConsulDouble | None) -> None:
        self.double = double
        if double is not None:
            self.host, self.port = "127.0.0.1", double.port
        else:
            addr = REAL.split("://")[-1]  # type: ignore[union-attr]
            self.host, port = addr.rsplit(":", 1)
            self.port = int(port)
        self.token = None if double is not None else os.environ.get("CONSUL_HTTP_TOKEN")
        self.client = consul.Consul(host=self.host, port=self.port, token=self.token)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def fail(self, service_id: str) -> None:
        assert self.client.agent.check.ttl_fail(f"service:{service_id}") is True, "the agent does not know the check"

    def check_status(self, service: str, service_id: str) -> str | None:
        """The status of the TTL check of ``service_id`` as Consul's health API lists it (None: no such check)."""
        _, checks = self.client.health.checks(service)
        statuses = [c["Status"] for c in checks if c.get("ServiceID") == service_id]
        assert len(statuses) <= 1, checks
        return statuses[0] if statuses else None

    def passing(self, service: str) -> list[int]:
        _, nodes = self.client.health.service(service, passing=True)
        return sorted(n["Service"]["Port"] for n in nodes)


@pytest.fixture(params=["double", pytest.param("agent", marks=pytest.mark.consul_agent)])
def backend(request):
    if request.param == "agent":
        if not REAL:
            pytest.skip("CONSUL_HTTP_ADDR is not set: no real Consul agent to run against")
        yield Backend(None)
        return
    double = ConsulDouble()
    yield Backend(double)
    double.stop()


@pytest.fixture
def double():
    d = ConsulDouble()
    yield d
    d.stop()


@pytest.fixture
def ups():
    started: list[Upstream] = []
    yield started
    for u in started:
        u.stop()


def register(backend: Backend, service: str, upstream: Upstream, tags: list[str] | None = None) -> ConsulRegistration:
    reg = ConsulRegistration(backend.client, service, "127.0.0.1", upstream.port, tags or [], {}, token=backend.token)
    reg.ttl = 2.0
    return reg.start()  # type: ignore[return-value]


def consul_mesh(backend: Backend, tmp_path, wait: float = 2.0) -> meshlib.Mesh:
    discovery = ConsulDiscovery(
        backend.host, backend.port, token=backend.token, state_dir=str(tmp_path / "client"), wait=wait
    )
    return meshlib.Mesh(service="frontend", discovery=discovery, control_plane="", state_dir=str(tmp_path / "client"))


def served_by(client: meshlib.Client, n: int = 40) -> Counter[str]:
    return Counter(client.get("http://payments/x").json()["instance"] for _ in range(n))


# -- contract: double and real agent --------------------------------------------------------------


def test_registration_is_passing_and_critical_instances_lose_traffic(backend, ups, tmp_path):
    a, b = Upstream("a"), Upstream("b")
    ups.extend([a, b])
    a.wait_listening()
    b.wait_listening()
    reg_a, reg_b = register(backend, "payments", a, ["v1"]), register(backend, "payments", b, ["v1"])
    try:
        wait_for(lambda: backend.passing("payments") == sorted([a.port, b.port]), what="both passing")
        mesh = consul_mesh(backend, tmp_path)
        with mesh, mesh.client() as client:
            assert set(served_by(client)) == {"a", "b"}
            handles = mesh.service_state("payments").handles
            assert all(h.endpoint.tags == frozenset({"v1"}) for h in handles)
            # the state this test relies on: b's TTL check exists and passes
            assert backend.check_status("payments", reg_b.id) == "passing"
            reg_b._stop.set()  # stop heartbeating b, then fail its check: it must stop getting traffic (watch)
            backend.fail(reg_b.id)
            assert backend.check_status("payments", reg_b.id) == "critical"
            assert backend.passing("payments") == [a.port]
            wait_for(lambda: set(served_by(client, 10)) == {"a"}, timeout=3, interval=0.01, what="b to drop out")
            assert set(served_by(client, 40)) == {"a"}  # and stays out
            c = Upstream("c")
            ups.append(c)
            c.wait_listening()
            reg_c = register(backend, "payments", c)
            wait_for(lambda: backend.check_status("payments", reg_c.id) == "passing", what="c's check to pass")
            wait_for(lambda: "c" in served_by(client, 20), timeout=3, interval=0.01, what="c to get traffic")
            reg_c.close()
    finally:
        reg_a.close()
        reg_b.close()
    wait_for(lambda: backend.passing("payments") == [], what="deregistration")


def test_idle_client_does_not_busy_loop(backend, ups, tmp_path):
    a = Upstream("a")
    ups.append(a)
    a.wait_listening()
    reg = register(backend, "payments", a)
    try:
        mesh = consul_mesh(backend, tmp_path, wait=1.0)
        with mesh, mesh.client() as client:
            client.get("http://payments/x")
            poller = mesh.discovery.pollers["payments"]  # type: ignore[attr-defined]
            before = poller.requests
            time.sleep(3.0)  # measuring an idle period: a fixed window is the point
            # heartbeats change the check (index bumps) only on state changes; a wait of 1 s gives ~3 answers
            assert poller.requests - before <= 8
    finally:
        reg.close()


def test_kv_store_contract(backend):
    store = ConsulRulesStore(backend.host, backend.port, token=backend.token, prefix=f"test-{time.monotonic_ns()}")
    assert store.current().version == 0
    v1 = store.put({"services": {"a": {}}}, None, "me", "first")
    assert v1.version == 1 and store.current().document == {"services": {"a": {}}}
    with pytest.raises(CasConflict):
        store.put({}, 0, "me", "stale")
    v2 = store.put({}, 1, "me", "second")
    assert v2.version == 2
    assert [r.version for r in store.history()] == [2, 1]
    assert store.get(1).comment == "first"
    # per-service resources: each block's version travels with the revision, in Consul as in SQLite
    write_resources(store, {"services/p": {"timeout": "1s"}}, {"services/p": 0}, "me", "", 1 << 20)
    write_resources(store, {"services/q": {"timeout": "2s"}}, {}, "me", "", 1 << 20)
    write_resources(store, {"services/p": {"timeout": "3s"}}, {"services/p": 3}, "me", "", 1 << 20)
    assert dict(store.current().resources) == {"services/a": 2, "services/p": 5, "services/q": 4}
    with pytest.raises(ResourceConflict):
        write_resources(store, {"services/p": {}}, {"services/p": 3}, "me", "", 1 << 20)
    assert [c.revision.version for c in resource_history(store, "services/p", 10)] == [5, 3]


# -- faults (the double's switches) ---------------------------------------------------------------


def test_weight_and_zone_meta_reach_consul_s_weights_and_the_endpoints(backend, ups):
    """A meshlib instance's ``weight`` meta becomes Consul's own ``Weights.Passing`` (so Consul's DNS and other
    Consul clients share alike), and the endpoints meshlib discovers carry that weight and the ``zone`` meta; an
    instance registered with Consul weights alone gets its weight from them."""
    a = Upstream("a")
    ups.append(a)
    a.wait_listening()
    reg = ConsulRegistration(
        backend.client, "weighed", "127.0.0.1", a.port, [], {"weight": "3", "zone": "eu-1a"}, token=backend.token
    ).start()
    other = f"weighed-other-{a.port}"
    backend.client.agent.service.register(
        "weighed", service_id=other, address="127.0.0.1", port=a.port + 1, weights={"Passing": 7, "Warning": 1}
    )
    try:
        _, entries = backend.client.health.service("weighed")
        by_id = {e["Service"]["ID"]: e["Service"] for e in entries}
        assert by_id[reg.id]["Weights"]["Passing"] == 3
        endpoints = {e.id: e for e in _endpoints("weighed", entries, 1).endpoints}
        assert (endpoints[reg.id].weight, endpoints[reg.id].zone) == (3, "eu-1a")
        assert (endpoints[other].weight, endpoints[other].zone) == (7, "")
    finally:
        backend.client.agent.service.deregister(other)
        reg.close()


def test_registration_sends_the_shape_py_consul_sends_and_the_check_exists(double, ups):
    """Pins the request py-consul 1.8 makes for a TTL-checked service (a lowercase ``checks`` list), and that the
    double (like Consul) turns it into the check ``service:<id>`` that heartbeats pass."""
    backend = Backend(double)
    a = Upstream("a")
    ups.append(a)
    a.wait_listening()
    reg = register(backend, "payments", a, ["v1"])
    try:
        sent = double.registrations[-1]
        assert sent["name"] == "payments" and sent["id"] == reg.id and sent["port"] == a.port
        assert sent["checks"] == [{"TTL": "2s", "DeregisterCriticalServiceAfter": "1m"}]
        assert "Check" not in sent and "check" not in sent
        assert double.check_status(reg.id) == "passing"
        assert backend.check_status("payments", reg.id) == "passing"
    finally:
        reg.close()
    assert double.check_status(reg.id) is None  # deregistration removed the check too


def test_critical_checks_are_deregistered_after_the_configured_time(double, ups):
    backend = Backend(double)
    a = Upstream("a")
    ups.append(a)
    a.wait_listening()
    reg = ConsulRegistration(backend.client, "payments", "127.0.0.1", a.port, [], {}, ttl=1.0, deregister_after="1s")
    reg.start()
    assert double.check_status(reg.id) == "passing"
    reg._stop.set()  # the instance stops heartbeating (a crash): TTL lapses, then the agent removes it
    wait_for(lambda: double.check_status(reg.id) == "critical", timeout=5, what="the TTL check to go critical")
    assert backend.passing("payments") == []
    wait_for(lambda: reg.id in double.deregistered_critical, timeout=5, what="DeregisterCriticalServiceAfter")
    assert reg.id not in double.services


@pytest.mark.parametrize("fault", ["leader", "429", "503", "hang"])
def test_consul_faults_back_off_and_keep_the_last_endpoints(fault, double, ups, tmp_path):
    backend = Backend(double)
    a = Upstream("a")
    ups.append(a)
    a.wait_listening()
    # a TTL longer than the outage: heartbeats fail during the fault too, and a lapsed check would (rightly) empty
    # the service; this test is about the watch
    reg = ConsulRegistration(backend.client, "payments", "127.0.0.1", a.port, [], {}, ttl=60.0).start()
    mesh = consul_mesh(backend, tmp_path, wait=1.0)
    try:
        with mesh, mesh.client() as client:
            assert client.get("http://payments/x").status_code == 200
            poller = mesh.discovery.pollers["payments"]  # type: ignore[attr-defined]
            errors = poller.errors
            double.fault = fault
            double.bump()  # wake the pending blocking query so it meets the fault now
            wait_for(lambda: poller.errors >= errors + 2, timeout=20, what=f"the watch to meet {fault} twice")
            before = double.requests_to("/v1/health/service/")
            time.sleep(2.0)  # an outage window: the client must neither spin nor drop the endpoints
            assert double.requests_to("/v1/health/service/") - before <= 6  # backoff, not a busy loop
            assert [client.get("http://payments/x").status_code for _ in range(20)] == [200] * 20
            answered = poller.requests - poller.errors  # started minus failed: includes the one in flight
            double.fault = None
            wait_for(lambda: poller.requests - poller.errors >= answered + 2, timeout=20, what="the watch to recover")
            errors = poller.errors
            double.stop()  # agent down: connection refused
            wait_for(lambda: poller.errors > errors, timeout=20, what="the watch to notice the agent is down")
            assert [client.get("http://payments/x").status_code for _ in range(20)] == [200] * 20
    finally:
        double.fault = None
        reg._stop.set()


def test_a_restart_while_consul_is_down_starts_from_the_state_dir(double, ups, tmp_path):
    backend = Backend(double)
    a = Upstream("a")
    ups.append(a)
    a.wait_listening()
    reg = register(backend, "payments", a)
    first = consul_mesh(backend, tmp_path, wait=1.0)
    with first, first.client() as client:
        assert client.get("http://payments/x").json()["instance"] == "a"
    reg._stop.set()
    double.stop()  # Consul goes down; then the process restarts with the same MESH_STATE_DIR
    second = consul_mesh(backend, tmp_path, wait=1.0)
    with second, second.client() as client:
        assert [client.get("http://payments/x").json()["instance"] for _ in range(5)] == ["a"] * 5


def test_index_reset_is_followed(double, ups, tmp_path):
    backend = Backend(double)
    a, b = Upstream("a"), Upstream("b")
    ups.extend([a, b])
    a.wait_listening()
    b.wait_listening()
    reg_a = register(backend, "payments", a)
    mesh = consul_mesh(backend, tmp_path, wait=0.5)
    with mesh, mesh.client() as client:
        assert set(served_by(client, 5)) == {"a"}
        double.reset_index(2)  # a snapshot restore: the index goes backwards
        time.sleep(0.1)
        reg_b = register(backend, "payments", b)
        wait_for(lambda: "b" in served_by(client, 20), timeout=5, what="a change after the reset")
        reg_b.close()
    reg_a.close()


def test_acl_filtered_list_does_not_empty_the_service(double, ups, tmp_path):
    backend = Backend(double)
    a = Upstream("a")
    ups.append(a)
    a.wait_listening()
    reg = register(backend, "payments", a)
    mesh = consul_mesh(backend, tmp_path, wait=0.5)
    with mesh, mesh.client() as client:
        assert client.get("http://payments/x").status_code == 200
        double.acl = {"agent-token": {"service_write": ["*"]}}  # the client's (absent) token may read nothing
        double.bump()
        time.sleep(1.5)  # two wait periods of filtered answers
        assert [client.get("http://payments/x").status_code for _ in range(10)] == [200] * 10
    reg._stop.set()


def test_registration_needs_service_write_and_retries_in_the_background(double, ups, caplog):
    backend = Backend(double)
    double.acl = {"reader": {"service_read": ["*"]}}
    a = Upstream("a")
    ups.append(a)
    a.wait_listening()
    reg = ConsulRegistration(
        consul.Consul(port=double.port, token="reader"),
        "payments",
        "127.0.0.1",
        a.port,
        [],
        {},
        token="reader",
        ttl=1.0,
    )
    reg.start()  # the documented path: a failed first registration is logged and retried in the background
    try:
        assert not reg.registered
        assert any("registration of" in r.getMessage() and "retrying" in r.getMessage() for r in caplog.records)
        double.acl = None
        assert backend.passing("payments") == []
        # the operator fixes the ACL (and lets the anonymous token read, for this test's own checks)
        double.acl = {"reader": {"service_read": ["*"], "service_write": ["payments"]}, "": {"service_read": ["*"]}}
        wait_for(lambda: backend.passing("payments") == [a.port], timeout=10, what="the background registration")
        assert reg.registered
    finally:
        double.acl = None
        reg.close()


@pytest.mark.parametrize("unknown_check_status", [404, 500])  # current agents, and older ones
def test_reregisters_when_the_agent_forgets(double, ups, unknown_check_status):
    double.unknown_check_status = unknown_check_status
    backend = Backend(double)
    a = Upstream("a")
    ups.append(a)
    a.wait_listening()
    reg = register(backend, "payments", a)
    wait_for(lambda: backend.passing("payments") == [a.port], what="registered")
    double.services.clear()  # an agent restart without its state
    double.checks.clear()
    double.bump()
    wait_for(lambda: backend.passing("payments") == [a.port], timeout=5, what="re-registration")
    reg.close()


def test_meshlib_serve_registers_in_consul_and_sigterm_deregisters(double, tmp_path):
    env = {
        "MESH_DISCOVERY": f"consul://127.0.0.1:{double.port}",
        "MESH_CONTROL_PLANE": "",
        "MESH_STATE_DIR": str(tmp_path / "s"),
    }
    u = Upstream("served", mesh_service="payments", tags="v2", env=env).wait_listening()
    try:
        backend = Backend(double)
        wait_for(lambda: backend.passing("payments") == [u.port], what="a passing instance")
        _, nodes = backend.client.health.service("payments", passing=True)
        assert nodes[0]["Service"]["Tags"] == ["v2"]
        u.proc.terminate()
        wait_for(lambda: backend.passing("payments") == [], timeout=10, what="deregistration on SIGTERM")
        assert u.proc.wait(15) in (0, -signal.SIGTERM)  # a clean exit on the signal, not a crash
    finally:
        u.stop()


def test_two_config_services_share_consul_kv(double, tmp_path):
    from meshlib.security.ca import CertificateAuthority

    CertificateAuthority.init(tmp_path / "ca", "mesh.local")  # replicas sign with one CA, never their own
    args = ("--store", f"consul://127.0.0.1:{double.port}/meshlib/rules")
    args += ("--ca-cert", str(tmp_path / "ca" / "ca.crt"), "--ca-key", str(tmp_path / "ca" / "ca.key"))
    one = ControlPlaneProcess(tmp_path / "one", extra_args=args)
    two = ControlPlaneProcess(tmp_path / "two", extra_args=args)
    try:
        version = one.apply({"services": {"payments": {"timeout": "2s"}}})
        import httpx

        wait_for(
            lambda: httpx.get(two.url + "/v1/rules").json()["version"] == version,
            timeout=5,
            what="the other config service to see the change",
        )
        assert two.put_rules({}, cas=version - 1).status_code == 409
        assert two.put_rules({"services": {}}, cas=version).status_code == 200
        wait_for(
            lambda: httpx.get(one.url + "/v1/rules").json()["version"] == version + 1,
            timeout=5,
            what="the first to follow",
        )
        assert [v["version"] for v in httpx.get(one.url + "/v1/rules/history").json()["versions"]] == [2, 1]
    finally:
        one.stop()
        two.stop()


def test_sqlite_and_consul_stores_behave_alike(double, tmp_path):
    for store in (SQLiteRulesStore(tmp_path / "r.db"), ConsulRulesStore("127.0.0.1", double.port)):
        assert store.current().version == 0
        assert store.put({"services": {}}, None).version == 1
        with pytest.raises(CasConflict):
            store.put({}, 0)
        assert store.put({"services": {"x": {}}}, 1, "a", "c").version == 2
        assert [r.version for r in store.history()] == [2, 1]
        assert store.get(2).document == {"services": {"x": {}}}
        store.close()


def test_discovery_setting_uses_consul_http_addr(double, monkeypatch, tmp_path):
    monkeypatch.setenv("CONSUL_HTTP_ADDR", f"http://127.0.0.1:{double.port}")
    mesh = meshlib.Mesh(service="x", discovery="consul://", control_plane="", state_dir=str(tmp_path))
    assert isinstance(mesh.discovery, ConsulDiscovery)
    with mesh, mesh.client() as client, pytest.raises(meshlib.NoEndpointsError):
        client.get("http://nothing/x")
    r = subprocess.run(
        [sys.executable, "-m", "meshlib.cli", "serve", "--store", "consul://nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "consul://host:port" in r.stderr


def test_a_registration_that_recovers_says_so_once(double, caplog):
    """Issue 31: the failed heartbeats were logged, their end was not. With Consul out (503) at the first
    registration and for a few heartbeats, then back, one line says the instance is registered again."""
    import logging

    backend = Backend(double)
    double.fault = "503"
    caplog.set_level(logging.WARNING, logger="meshlib")
    reg = ConsulRegistration(backend.client, "payments", "127.0.0.1", 9, [], {}, ttl=0.6).start()
    try:
        assert not reg.registered
        wait_for(lambda: sum("heartbeat for" in r.message for r in caplog.records) >= 2, timeout=10, what="2 fails")
        double.fault = None
        wait_for(lambda: reg.registered and reg.id in double.services, timeout=10, what="the registration")
        wait_for(lambda: any("registered again" in r.message for r in caplog.records), timeout=5, what="the line")
        line = next(r.message for r in caplog.records if "registered again" in r.message)
        assert reg.id in line and "failed attempt(s)" in line
        time.sleep(1.5)  # several more heartbeats: still one line
        assert sum("registered again" in r.message for r in caplog.records) == 1
    finally:
        double.fault = None
        reg.close()
