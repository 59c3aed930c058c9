"""Control-plane failover: how long clients take to carry on when the replica they use is SIGKILLed (not a CI test).

    python bench/failover.py [--kills 20] [--instances 50]

Three ``meshctl serve --store consul://…`` replicas over the project's Consul double (``tests/consul_double.py``,
on loopback), ``--instances`` registered instances (TTL 3 s, heartbeats every second) spread over the replicas,
and per round a fresh client placed on the victim: a rules watch and a registration. The victim is killed
(SIGKILL); measured from the kill:

- **watch**: until the watch holds a rules version written to a surviving replica right after the kill;
- **heartbeat**: until a heartbeat of the client's registration is written by a surviving replica.

The victim is restarted on its port before the next round. At the end: every replica's RSS, and that no
instance expired during the run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import httpx  # noqa: E402

import meshlib.replicas  # noqa: E402
from consul_double import ConsulDouble  # noqa: E402
from harness import ADMIN_TOKEN, ControlPlaneProcess, rss_mb, wait_for  # noqa: E402
from meshlib.discovery.registry import RegistryRegistration  # noqa: E402
from meshlib.replicas import ReplicaSet, replica_client  # noqa: E402
from meshlib.rules.watcher import RulesWatcher  # noqa: E402
from meshlib.security.ca import CertificateAuthority  # noqa: E402

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--instances", type=int, default=50)
    args = parser.parse_args()
    double = ConsulDouble()
    work = Path(tempfile.mkdtemp(prefix="failover-"))
    CertificateAuthority.init(work / "ca", "mesh.local")
    serve_args = (
        "--store",
        f"consul://{double.address}/meshlib/rules",
        "--ca-cert",
        str(work / "ca" / "ca.crt"),
        "--ca-key",
        str(work / "ca" / "ca.key"),
    )
    replicas = [ControlPlaneProcess(work / f"r{i}", extra_args=serve_args) for i in range(3)]
    urls = [r.url for r in replicas]
    made = httpx.post(f"{urls[0]}/v1/tokens", json={"services": ["payments"]}, headers=ADMIN).json()
    token = {"authorization": f"Bearer {made['token']}"}
    time.sleep(0.5)  # the token reaches the other replicas (one blocking query)
    fleet = [
        RegistryRegistration(
            replica_client(urls, replicas=ReplicaSet(urls, start=n), timeout=5, trust_env=False, headers=token),
            "payments",
            "127.0.0.1",
            20000 + n,
            [],
            {},
            ttl=3.0,
        ).start()
        for n in range(args.instances)
    ]
    watch_times: list[float] = []
    beat_times: list[float] = []
    version = 0
    try:
        for round_ in range(args.kills):
            victim = round_ % 3
            survivor = replicas[(victim + 1) % 3]
            meshlib.replicas.start_index = lambda count, v=victim: v  # type: ignore[assignment]
            watcher = RulesWatcher(",".join(urls), lambda rules: None).start()
            client = RegistryRegistration(
                replica_client(urls, timeout=5, trust_env=False, headers=token),
                "payments",
                "127.0.0.1",
                30000 + round_,
                [],
                {},
                ttl=3.0,
            ).start()
            assert watcher.wait_for_version(version, 10)
            key = f"meshlib/rules/registry/alive/{client.id}"
            wait_for(lambda k=key: k in double.kv, timeout=5, what="the client's first heartbeat")
            before = double.kv[key]["raw"]
            writer = before.split(b":")[0]
            replicas[victim].kill()
            killed = time.monotonic()
            version = survivor.apply({"services": {"payments": {"timeout": f"{round_ + 1}s"}}})
            assert watcher.wait_for_version(version, 10), "the watch did not move"
            watch_times.append(time.monotonic() - killed)
            wait_for(
                lambda k=key, w=writer: double.kv.get(k, {}).get("raw", w).split(b":")[0] != w,
                timeout=10,
                interval=0.005,
                what="a heartbeat through a survivor",
            )
            beat_times.append(time.monotonic() - killed)
            watcher.close()
            client.close()
            replicas[victim] = ControlPlaneProcess(
                work / f"r{victim}", port=replicas[victim].port, extra_args=serve_args
            )
            took = f"watch {watch_times[-1] * 1000:.0f} ms, heartbeat {beat_times[-1] * 1000:.0f} ms"
            print(f"round {round_ + 1}: {took}")
        time.sleep(1.0)  # the last deregistration reaches every replica's view
        listed = {
            r.url: sorted(i["id"] for i in httpx.get(f"{r.url}/v1/registry/services/payments").json()["instances"])
            for r in replicas
        }
        extra = sorted({i for ids in listed.values() for i in ids} - {f.id for f in fleet})
        print("left over:", extra)
        renamed = [f.id for f in fleet if not f.id.endswith(f"-{f.body['port']}")]
        print("instances that lost their registration (re-registered under a new id):", len(renamed))
        print()
        print(f"kills: {args.kills}, instances registered throughout: {args.instances}")
        for name, values in (("watch", watch_times), ("heartbeat", beat_times)):
            p50, p99 = statistics.median(values) * 1000, percentile(values, 0.99) * 1000
            print(f"{name:9s}  p50 {p50:6.0f} ms   p99 {p99:6.0f} ms   max {max(values) * 1000:6.0f} ms")
        print("instances listed per replica at the end:", sorted(len(ids) for ids in listed.values()))
        print("replica RSS (MB):", ", ".join(f"{rss_mb(r.proc.pid):.1f}" for r in replicas))
    finally:
        for registration in fleet:
            registration.close()
        for replica in replicas:
            replica.stop()
        double.stop()


if __name__ == "__main__":
    main()
