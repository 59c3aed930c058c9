"""meshlib.Client vs plain httpx.Client, side by side in one run (not a CI test).

    python bench/overhead.py [--rounds 7] [--requests 2000] [--only tls|memory]

Three measurements, each as interleaved rounds (A, B, A, B, ...) so drift hits both sides alike; reports the median
and p99 of per-request figures and the ratios:
  * no-network: both clients over a fake connection pool that answers at once, so only client-side CPU is measured
    (meshlib's own work = meshlib CPU/request - httpx CPU/request);
  * loopback: both clients against the same uvicorn server on 127.0.0.1 (throughput ratio, latency);
  * memory: RSS added by importing meshlib and making one mesh call, over an httpx application doing the same.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpcore
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import meshlib  # noqa: E402
from meshlib.discovery import StaticDiscovery  # noqa: E402
from meshlib.endpoints import Endpoint  # noqa: E402
from meshlib.http import MeshTransport  # noqa: E402


class InstantPool:
    """An httpcore-compatible pool that answers every request at once with a small 200."""

    def handle_request(self, request: httpcore.Request) -> httpcore.Response:
        return httpcore.Response(200, headers=[(b"content-length", b"2")], content=b"ok")

    def close(self) -> None:
        pass


def make_clients(port: int, no_network: bool, telemetry: bool = True) -> tuple[httpx.Client, httpx.Client]:
    mesh = meshlib.Mesh(
        service="bench",
        discovery=StaticDiscovery({"svc": [Endpoint("127.0.0.1", port)]}),
        control_plane="",
        telemetry=telemetry,
    )
    if no_network:
        plain_transport = httpx.HTTPTransport()
        plain_transport._pool = InstantPool()  # type: ignore[assignment]
        plain = httpx.Client(transport=plain_transport)
        mesh_client = meshlib.Client(mesh=mesh, transport=MeshTransport(mesh, pool=InstantPool()))
    else:
        plain = httpx.Client()
        mesh_client = meshlib.Client(mesh=mesh)
    return plain, mesh_client


def run_round(client: httpx.Client, url: str, n: int) -> tuple[float, float, list[float]]:
    """(wall seconds, CPU seconds, per-request latencies) for n sequential GETs."""
    latencies = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        r = client.get(url)
        r.read()
        latencies.append(time.perf_counter() - t)
    return time.perf_counter() - wall0, time.process_time() - cpu0, latencies


def p99(values: list[float]) -> float:
    return sorted(values)[int(len(values) * 0.99) - 1]


def compare(name: str, port: int, no_network: bool, rounds: int, n: int) -> dict[str, float]:
    plain, mesh_client = make_clients(port, no_network)
    plain_url = f"http://127.0.0.1:{port}/-/ok"
    mesh_url = "http://svc/-/ok"
    for client, url in ((plain, plain_url), (mesh_client, mesh_url)):
        run_round(client, url, min(n, 300))  # warm up: connections, caches
    stats: dict[str, list[float]] = {k: [] for k in ("plain_cpu", "mesh_cpu", "plain_wall", "mesh_wall")}
    lat: dict[str, list[float]] = {"plain": [], "mesh": []}
    for _ in range(rounds):
        for label, client, url in (("plain", plain, plain_url), ("mesh", mesh_client, mesh_url)):
            wall, cpu, latencies = run_round(client, url, n)
            stats[f"{label}_cpu"].append(cpu / n * 1e6)
            stats[f"{label}_wall"].append(wall / n * 1e6)
            lat[label].extend(latencies)
    plain.close()
    mesh_client.close()
    med = {k: statistics.median(v) for k, v in stats.items()}
    best = {k: min(v) for k, v in stats.items()}
    out = {
        "added_cpu_us_best": best["mesh_cpu"] - best["plain_cpu"],
        "plain_cpu_us": med["plain_cpu"],
        "mesh_cpu_us": med["mesh_cpu"],
        "added_cpu_us": med["mesh_cpu"] - med["plain_cpu"],
        "throughput_ratio": med["plain_wall"] / med["mesh_wall"],
        "plain_p50_us": statistics.median(lat["plain"]) * 1e6,
        "mesh_p50_us": statistics.median(lat["mesh"]) * 1e6,
        "plain_p99_us": p99(lat["plain"]) * 1e6,
        "mesh_p99_us": p99(lat["mesh"]) * 1e6,
    }
    print(f"\n== {name} ({rounds} interleaved rounds x {n} requests)")
    print(
        f"  CPU/request    httpx {out['plain_cpu_us']:8.1f} us   meshlib {out['mesh_cpu_us']:8.1f} us"
        f"   meshlib's own work {out['added_cpu_us']:+7.1f} us"
    )
    print(
        "  CPU/request, best round each side (least disturbed by the VM's neighbours): meshlib's own work "
        f"{out['added_cpu_us_best']:+.1f} us"
    )
    print(
        f"  latency p50    httpx {out['plain_p50_us']:8.1f} us   meshlib {out['mesh_p50_us']:8.1f} us"
        f"   ratio {out['mesh_p50_us'] / out['plain_p50_us']:.3f}"
    )
    print(
        f"  latency p99    httpx {out['plain_p99_us']:8.1f} us   meshlib {out['mesh_p99_us']:8.1f} us"
        f"   ratio {out['mesh_p99_us'] / out['plain_p99_us']:.3f}"
    )
    print(f"  throughput ratio meshlib/httpx {out['throughput_ratio']:.3f}")
    return out


_RSS_SNIPPET = """
import sys, resource
sys.path.insert(0, {tests!r})
from harness import Upstream
port = int(sys.argv[1])
{body}
def rss_kb():
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS'):
                return int(line.split()[1])
print(rss_kb())
"""
_PLAIN = "import httpx\nc = httpx.Client()\nc.get(f'http://127.0.0.1:{port}/x')\n"
_MESH = (
    "import meshlib\n"
    "m = meshlib.Mesh(service='bench', discovery=f'static:svc=127.0.0.1:{port}', control_plane='')\n"
    "c = m.client()\nc.get('http://svc/x')\n"
)


def telemetry_cost(port: int, rounds: int, n: int) -> float:
    """meshlib with telemetry on (metrics recorded, spans created but not recorded: no SDK tracer configured)
    against meshlib with MESH_TELEMETRY=off, both on the no-network transport."""
    _, on = make_clients(port, True, telemetry=True)
    _, off = make_clients(port, True, telemetry=False)
    url = "http://svc/-/ok"
    run_round(on, url, 300)
    run_round(off, url, 300)
    cpu: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(rounds):
        for label, client in (("off", off), ("on", on)):
            _, used, _ = run_round(client, url, n)
            cpu[label].append(used / n * 1e6)
    med = statistics.median(cpu["on"]) - statistics.median(cpu["off"])
    best = min(cpu["on"]) - min(cpu["off"])
    print(f"\n== telemetry on vs off (no-network, {rounds} interleaved rounds x {n} requests)")
    print(
        f"  CPU/request  off {statistics.median(cpu['off']):7.1f} us   on {statistics.median(cpu['on']):7.1f} us"
        f"   telemetry costs {med:+.1f} us (best rounds: {best:+.1f} us)"
    )
    return med


def tls_cost(rounds: int, n: int) -> float:
    """meshlib over keep-alive mTLS (strict) vs meshlib over plaintext, each against a meshlib.serve instance of the
    same app, the TLS one in strict mode. Needs a control plane (its CA): one is started here."""
    import os
    import tempfile

    from harness import ControlPlaneProcess, Upstream

    with tempfile.TemporaryDirectory() as tmp:
        cp = ControlPlaneProcess(Path(tmp) / "cp", bootstrap_token="bench")
        base = {
            "MESH_DISCOVERY": f"registry://127.0.0.1:{cp.port}",
            "MESH_CONTROL_PLANE": cp.url,
            "MESH_BOOTSTRAP_TOKEN": "bench",
        }
        plain_up = Upstream(
            "plain", mesh_service="plain", env={**base, "MESH_TLS": "off", "MESH_STATE_DIR": f"{tmp}/p"}
        ).wait_listening()
        tls_up = Upstream(
            "tls", mesh_service="secure", env={**base, "MESH_TLS": "strict", "MESH_STATE_DIR": f"{tmp}/t"}
        ).wait_listening()
        os.environ["MESH_BOOTSTRAP_TOKEN"] = "bench"
        try:
            plain_mesh = meshlib.Mesh(  # the same control plane (rules, routing) as the TLS side: only TLS differs
                service="bench",
                discovery=f"static:plain=127.0.0.1:{plain_up.port}",
                control_plane=cp.url,
                state_dir=f"{tmp}/c1",
            )
            tls_mesh = meshlib.Mesh(
                service="bench",
                discovery=f"static:secure=127.0.0.1:{tls_up.port}",
                control_plane=cp.url,
                tls="strict",
                state_dir=f"{tmp}/c2",
            )
            plain, secure = plain_mesh.client(), tls_mesh.client()
            run_round(plain, "http://plain/-/ok", 300)
            run_round(secure, "http://secure/-/ok", 300)
            wall: dict[str, list[float]] = {"plain": [], "tls": []}
            lat: dict[str, list[float]] = {"plain": [], "tls": []}
            for _ in range(rounds):
                for label, client, url in (
                    ("plain", plain, "http://plain/-/ok"),
                    ("tls", secure, "http://secure/-/ok"),
                ):
                    w, _, latencies = run_round(client, url, n)
                    wall[label].append(w / n * 1e6)
                    lat[label].extend(latencies)
            ratio = statistics.median(wall["tls"]) / statistics.median(wall["plain"])
            paired = statistics.median(t / p for t, p in zip(wall["tls"], wall["plain"], strict=True))
            print(f"\n== keep-alive mTLS vs plaintext (meshlib both sides, loopback, {rounds} rounds x {n} requests)")
            print(
                f"  per request  plaintext {statistics.median(wall['plain']):7.1f} us   mTLS "
                f"{statistics.median(wall['tls']):7.1f} us   ratio {ratio:.3f} (per-round {paired:.3f})"
            )
            print(
                f"  latency p50 ratio {statistics.median(lat['tls']) / statistics.median(lat['plain']):.3f}"
                f"   p99 ratio {p99(lat['tls']) / p99(lat['plain']):.3f}"
            )
            plain.close()
            secure.close()
            plain_mesh.close()
            tls_mesh.close()
            return ratio
        finally:
            plain_up.stop()
            tls_up.stop()
            cp.stop()


def memory(port: int, rounds: int = 3) -> float:
    def rss(body: str) -> int:
        code = _RSS_SNIPPET.format(tests=str(ROOT / "tests"), body=body)
        return int(subprocess.check_output([sys.executable, "-c", code, str(port)], text=True).strip())

    plain = [rss(_PLAIN) for _ in range(rounds)]
    mesh = [rss(_MESH) for _ in range(rounds)]
    added = (statistics.median(mesh) - statistics.median(plain)) / 1024
    print(
        f"\n== memory: httpx app {statistics.median(plain) / 1024:.1f} MB, with meshlib "
        f"{statistics.median(mesh) / 1024:.1f} MB RSS: meshlib adds {added:.1f} MB"
    )
    return added


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--only", choices=["tls", "memory"], help="run only this comparison")
    args = parser.parse_args()
    from harness import Upstream

    if args.only == "tls":
        tls_cost(args.rounds, args.requests // 2)
        return
    upstream = Upstream("bench").wait_listening()
    if args.only == "memory":
        try:
            memory(upstream.port, args.rounds)
        finally:
            upstream.stop()
        return
    try:
        compare("no-network transport", upstream.port, True, args.rounds, args.requests)
        compare("loopback uvicorn", upstream.port, False, args.rounds, args.requests // 2)
        telemetry_cost(upstream.port, args.rounds, args.requests)
        tls_cost(args.rounds, args.requests // 2)
        memory(upstream.port)
    finally:
        upstream.stop()


if __name__ == "__main__":
    main()
