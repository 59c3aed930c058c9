"""The demo's live terminal view (rich): golden signals of the traffic and the payments split, per scene."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import TYPE_CHECKING, Any

from .demo_samples import summarize

if TYPE_CHECKING:
    from .demo import Demo, Traffic


def start_live(demo: Demo, traffic: Traffic) -> Any:
    try:
        from rich.console import Group
        from rich.live import Live
        from rich.panel import Panel
        from rich.table import Table
    except ImportError:
        demo.ui = False
        return None

    def render() -> Any:
        now = time.monotonic()
        stats = summarize(traffic.window(now - 3), 3)
        table = Table(title=f"meshlib demo — scene: {demo.scene}", expand=True)
        for col in ("req/s", "success", "p50 ms", "p99 ms", "payments v1", "payments v2", "errors"):
            table.add_column(col, justify="right")
        total = sum(stats["versions"].values()) or 1
        table.add_row(
            f"{stats['rps']:.0f}",
            f"{stats['success']:.1%}",
            f"{stats['p50']:.1f}",
            f"{stats['p99']:.1f}",
            f"{stats['versions']['v1'] / total:.0%}",
            f"{stats['versions']['v2'] / total:.0%}",
            ", ".join(f"{k}: {v}" for k, v in traffic.errors.items()) or "-",
        )
        per_service = Table(title="golden signals per service (from each instance's /-/mesh/metrics)", expand=True)
        for col in ("service", "req/s", "success", "p50 ms", "p99 ms"):
            per_service.add_column(col, justify="right" if col != "service" else "left")
        for row in demo.signal_rows:
            per_service.add_row(
                row.service, f"{row.rate:.0f}", f"{row.success:.1%}", f"{row.p50_ms:.1f}", f"{row.p99_ms:.1f}"
            )
        results = "\n".join(f"{'PASS' if r.passed else 'FAIL'}  {r.name}: {r.detail}" for r in demo.results)
        return Group(
            table, per_service, Panel("\n".join(demo.log_lines), title="events"), Panel(results or "…", title="scenes")
        )

    live = Live(render(), refresh_per_second=4, transient=False)
    live.start()

    def refresh() -> None:
        last = 0.0
        while live.is_started and not traffic.stop.is_set():
            if time.monotonic() - last >= 1.0:
                last = time.monotonic()
                with contextlib.suppress(Exception):  # a scraping hiccup must not stop the view
                    demo.signal_rows = demo.golden_signals()
            live.update(render())
            time.sleep(0.25)

    threading.Thread(target=refresh, daemon=True).start()
    return live


def interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def dashboard_back(demo: Demo) -> None:
    """After the "control plane down" scene: start it again (same port and state), so the dashboard comes back,
    and say what it shows once instances have reported to it."""
    if demo.control_plane is not None and demo.control_plane.poll() is not None:
        demo.start_control_plane()
        demo.say(f"control plane restarted: instances re-register and report; dashboard at {demo.cp_url}/ui")

    expected = {
        "loadgen->frontend",
        "frontend->catalog",
        "catalog->inventory",
        "frontend->checkout",
        "checkout->payments",
    }

    def reported() -> Any:
        topology = demo._get("/v1/stats/topology") or {}
        return expected <= {f"{e['source']}->{e['destination']}" for e in topology.get("edges", [])}

    try:
        demo.wait(reported, 20, "the instances' reports to the dashboard")
    except RuntimeError as exc:
        demo.say(f"dashboard: {exc}")
        return
    topology = demo._get("/v1/stats/topology")
    edges = ", ".join(f"{e['source']}->{e['destination']}" for e in topology["edges"])
    demo.say(f"dashboard: {len(topology['services'])} services, {len(topology['edges'])} edges ({edges})")
    _v2_shares(demo)


def _v2_shares(demo: Demo) -> None:
    """The dashboard's payments page: both healthy v2 instances take a fair part of the v2 traffic (the broken one
    is ejected). One line the demo test reads."""
    healthy = {c.port: c.name for c in demo.children if c.name in ("payments-v2-1", "payments-v2-2")}
    rates: dict[str, float] = {}

    def measured() -> bool:
        detail = demo._get("/v1/stats/services/payments") or {}
        rates.clear()
        for instance in detail.get("instances", []):
            name = healthy.get(instance.get("port"))
            if name is not None and instance.get("rps"):
                rates[name] = float(instance["rps"])
        return len(rates) == len(healthy) and min(rates.values()) >= 0.25 * sum(rates.values())

    with contextlib.suppress(RuntimeError):  # a timeout is said below, with what was seen
        demo.wait(measured, 20, "both payments v2 instances to report their share")
    total = sum(rates.values()) or 1.0
    shares = ", ".join(
        f"{name} {rates.get(name, 0.0):.1f} req/s ({rates.get(name, 0.0) / total:.0%})"
        for name in sorted(healthy.values())
    )
    demo.say(f"dashboard: payments v2 instances: {shares}")
