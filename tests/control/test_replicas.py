"""Three control-plane replicas over one Consul (``meshctl serve --store consul://…``) and clients that fail over
between them (``MESH_CONTROL_PLANE=a,b,c``).

Real parts: three ``meshctl serve`` subprocesses, a real upstream process carrying traffic, a real ``Mesh`` (rules
watch, certificate, stats reports) and a real registration with heartbeats in this process. Consul is the
project's double of its HTTP API (``consul_double.py``); with ``CONSUL_HTTP_ADDR`` set, the same test runs against
that agent too (under a prefix of its own).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import consul
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import meshlib
import meshlib.replicas
from consul_double import ConsulDouble
from harness import ADMIN_TOKEN, ControlPlaneProcess, Upstream, wait_for
from meshlib.discovery.registry import RegistryRegistration
from meshlib.replicas import replica_client
from meshlib.rules.watcher import RulesWatcher
from meshlib.security.ca import CertificateAuthority
from meshlib.settings import MeshSettings

pytestmark = pytest.mark.e2e  # starts control planes and an upstream

REAL = os.environ.get("CONSUL_HTTP_ADDR")
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


class Consul:
    """Where the replicas keep their state: the double, or a real agent under a fresh prefix."""

    def __init__(self, double: ConsulDouble | None) -> None:
        self.double = double
        if double is not None:
            self.address, self.prefix, token = double.address, "meshlib/rules", None
        else:
            self.address = REAL.split("://")[-1]  # type: ignore[union-attr]
            self.prefix, token = f"test-{time.monotonic_ns()}/rules", os.environ.get("CONSUL_HTTP_TOKEN")
        host, port = self.address.rsplit(":", 1)
        self.client = consul.Consul(host=host, port=int(port), token=token)

    def value(self, key: str) -> bytes | None:
        _, item = self.client.kv.get(f"{self.prefix}/{key}")
        return item["Value"] if item else None


@pytest.fixture(params=["double", pytest.param("agent", marks=pytest.mark.consul_agent)])
def store(request):
    if request.param == "agent":
        if not REAL:
            pytest.skip("CONSUL_HTTP_ADDR is not set: no real Consul agent to run against")
        yield Consul(None)
        return
    double = ConsulDouble()
    yield Consul(double)
    double.stop()


def replica_args(tmp_path: Path, store: Consul) -> tuple[str, ...]:
    ca = tmp_path / "ca"
    if not (ca / "ca.key").exists():
        CertificateAuthority.init(ca, "mesh.local")  # what `meshctl ca init --state-dir` writes, mounted on each
    return (
        "--store",
        f"consul://{store.address}/{store.prefix}",
        "--ca-cert",
        str(ca / "ca.crt"),
        "--ca-key",
        str(ca / "ca.key"),
    )


def csr_pem(service: str) -> tuple[str, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(f"spiffe://mesh.local/ns/default/sa/{service}"),
                    x509.DNSName(f"{service}.default.mesh"),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode(), key


def listed(url: str, instance_id: str) -> bool:
    r = httpx.get(f"{url}/v1/registry/services/payments", timeout=2)
    return instance_id in [i["id"] for i in r.json()["instances"]]


def dashboard_shows(url: str, instance_id: str) -> bool:
    r = httpx.get(f"{url}/v1/stats/services/payments", timeout=2)
    if r.status_code != 200:
        return False
    rows = {row["id"]: row for row in r.json()["instances"]}
    return instance_id in rows and rows[instance_id]["registered"] and rows[instance_id]["reporting"]


def test_three_replicas_share_one_state_and_clients_fail_over_when_one_is_killed(store, tmp_path, monkeypatch):
    args = replica_args(tmp_path, store)
    a, b, c = (ControlPlaneProcess(tmp_path / name, extra_args=args) for name in "abc")
    urls = [a.url, b.url, c.url]
    # every client starts on A, the replica that will be killed (by default each starts on one at random)
    monkeypatch.setattr(meshlib.replicas, "start_index", lambda count: 0)
    upstream = Upstream("payments").wait_listening()
    cleanup: list = []
    try:
        # a join token made on A is known to B and C: tokens live in Consul
        made = httpx.post(f"{a.url}/v1/tokens", json={"services": ["payments"]}, headers=ADMIN, timeout=5)
        assert made.status_code == 201, made.text
        token = made.json()["token"]
        for replica in (b, c):
            wait_for(
                lambda r=replica: (
                    made.json()["id"]
                    in [t["id"] for t in httpx.get(f"{r.url}/v1/tokens", headers=ADMIN).json()["tokens"]]
                ),
                timeout=5,
                what="the token on every replica",
            )

        # the instance: registered (a 1.5 s TTL, so a lapse would show within the test), watching, reporting
        registration = RegistryRegistration(
            replica_client(",".join(urls), timeout=5, trust_env=False, headers={"authorization": f"Bearer {token}"}),
            "payments",
            "127.0.0.1",
            upstream.port,
            [],
            {"mesh_tls": "off"},  # the upstream serves plain HTTP
            ttl=1.5,
        ).start()
        cleanup.append(registration.close)
        assert registration.registered
        settings = MeshSettings.from_env(
            {},
            service="payments",
            control_plane=",".join(urls),
            tls="permissive",
            bootstrap_token=token,
            stats_interval=0.3,
            state_dir=str(tmp_path / "mesh"),
        )
        mesh = meshlib.Mesh(settings=settings)
        cleanup.append(mesh.close)
        assert mesh.stats is not None and mesh.rules_watcher is not None and mesh.identity is not None
        mesh.stats.serving(registration, "127.0.0.1", upstream.port)

        watch_b = RulesWatcher(b.url, lambda rules: None).start()
        watch_c = RulesWatcher(c.url, lambda rules: None).start()
        cleanup += [watch_b.close, watch_c.close]
        for replica in (a, b, c):
            wait_for(lambda r=replica: listed(r.url, registration.id), timeout=5, what="the instance everywhere")

        # traffic runs through the mesh for the whole test
        failures: list[str] = []
        calls = [0]
        stop = threading.Event()

        def traffic() -> None:
            with mesh.client() as client:
                while not stop.is_set():
                    try:
                        r = client.get("http://payments/", timeout=5)
                        if r.status_code != 200:
                            failures.append(f"{r.status_code}")
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))
                    calls[0] += 1

        runner = threading.Thread(target=traffic, daemon=True)
        runner.start()
        cleanup.insert(0, lambda: (stop.set(), runner.join(10)))
        wait_for(lambda: calls[0] >= 20, timeout=10, what="traffic")

        # a rules change applied to A reaches the clients watching B and C within a second
        version = a.apply({"services": {"payments": {"timeout": "2s"}}})
        started = time.monotonic()
        assert watch_b.wait_for_version(version, 1.0), "B's watcher did not see A's change within 1 s"
        assert watch_c.wait_for_version(version, 1.0 - (time.monotonic() - started)), "C's watcher: over 1 s"
        assert mesh.rules_watcher.wait_for_version(version, 5)

        # the dashboard of every replica shows the instance (reports go to each one)
        for replica in (a, b, c):
            wait_for(lambda r=replica: dashboard_shows(r.url, registration.id), timeout=10, what="the dashboard")

        # a certificate issued by any replica verifies against the one trust bundle (read from another replica)
        roots = {httpx.get(f"{r.url}/v1/ca/roots").json()["roots"][0] for r in (a, b, c)}
        assert len(roots) == 1
        root = x509.load_pem_x509_certificate(roots.pop().encode())
        for replica in (a, b, c):
            pem, _ = csr_pem("payments")
            signed = httpx.post(
                f"{replica.url}/v1/ca/sign",
                json={"csr": pem, "service": "payments", "namespace": "default"},
                headers={"authorization": f"Bearer {token}"},
            )
            assert signed.status_code == 200, signed.text
            x509.load_pem_x509_certificate(signed.json()["certificate"].encode()).verify_directly_issued_by(root)

        # two concurrent writes to different replicas: one winner, one 409
        barrier = threading.Barrier(2)
        statuses: list[int] = []

        def write(replica: ControlPlaneProcess, timeout: str) -> None:
            barrier.wait()
            statuses.append(
                replica.put_rules({"services": {"payments": {"timeout": timeout}}}, cas=version).status_code
            )

        writers = [threading.Thread(target=write, args=(b, "3s")), threading.Thread(target=write, args=(c, "4s"))]
        for w in writers:
            w.start()
        for w in writers:
            w.join(10)
        assert sorted(statuses) == [200, 409]
        acknowledged = [version, version + 1]

        # A is SIGKILLed
        heartbeat_key = f"registry/alive/{registration.id}"
        before = store.value(heartbeat_key)
        reports_on_b = httpx.get(f"{b.url}/v1/stats").json()["reports"]
        a.kill()
        killed = time.monotonic()

        assert before is not None
        on_a = before.split(b":")[0]  # heartbeat keys hold "<replica>:<count>": A's until now
        wait_for(
            lambda: (store.value(heartbeat_key) or on_a).split(b":")[0] != on_a,
            timeout=5,
            interval=0.01,
            what="a heartbeat through B or C",
        )
        heartbeat_moved = time.monotonic() - killed
        mesh.identity.refresh()  # a renewal: a new CSR, signed by B or C
        renewed = time.monotonic() - killed
        moved = b.apply({"services": {"payments": {"timeout": "5s"}}})
        acknowledged.append(moved)
        assert mesh.rules_watcher.wait_for_version(moved, 5 - (time.monotonic() - killed)), "the watch did not move"
        wait_for(lambda: httpx.get(f"{b.url}/v1/stats").json()["reports"] > reports_on_b + 1, timeout=5, what="reports")
        assert max(heartbeat_moved, renewed, time.monotonic() - killed) < 5

        # no instance expires: it stays listed on B and C over three of its TTLs
        deadline = time.monotonic() + 3 * registration.ttl
        while time.monotonic() < deadline:
            assert listed(b.url, registration.id) and listed(c.url, registration.id), "the instance expired"
            time.sleep(0.1)

        # no acknowledged rules write is lost
        history = httpx.get(f"{c.url}/v1/rules/history").json()["versions"]
        assert set(acknowledged) <= {v["version"] for v in history}

        # A comes back on its port and catches up: rules, registry, dashboard
        a = ControlPlaneProcess(tmp_path / "a", port=a.port, extra_args=args)
        assert httpx.get(f"{a.url}/v1/rules").json()["version"] == moved
        assert listed(a.url, registration.id)
        wait_for(lambda: dashboard_shows(a.url, registration.id), timeout=20, what="A's dashboard again")

        stop.set()
        runner.join(10)
        assert calls[0] > 50 and not failures, failures[:5]
    finally:
        for close in cleanup:
            close()
        upstream.stop()
        for replica in (a, b, c):
            replica.stop()


def test_a_replica_needs_the_shared_ca(store, tmp_path):
    """Replicas never make a CA of their own: certificates from two replicas must verify against one bundle."""
    import subprocess
    import sys

    serve = [sys.executable, "-m", "meshlib.cli", "serve", "--port", "0", "--state-dir", str(tmp_path / "s")]
    run = subprocess.run(
        [*serve, "--store", f"consul://{store.address}/{store.prefix}"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "MESH_ADMIN_TOKEN": ADMIN_TOKEN},
    )
    assert run.returncode != 0
    assert "--ca-cert and --ca-key" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "s" / "ca.key").exists()


def test_a_replica_that_cannot_reach_consul_says_so(tmp_path):
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nobody = s.getsockname()[1]
    CertificateAuthority.init(tmp_path / "ca", "mesh.local")
    serve = [sys.executable, "-m", "meshlib.cli", "serve", "--port", "0", "--state-dir", str(tmp_path / "s")]
    ca = ["--ca-cert", str(tmp_path / "ca" / "ca.crt"), "--ca-key", str(tmp_path / "ca" / "ca.key")]
    run = subprocess.run(
        [*serve, "--store", f"consul://127.0.0.1:{nobody}/meshlib/rules", *ca],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MESH_ADMIN_TOKEN": ADMIN_TOKEN},
    )
    assert run.returncode != 0
    assert f"check that the agent is up at 127.0.0.1:{nobody}" in run.stderr and "Traceback" not in run.stderr
