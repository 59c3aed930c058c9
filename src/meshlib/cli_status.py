"""``meshctl status``: services, instances and golden signals.

The figures come from the control plane's ``/v1/stats`` (what instances report to its dashboard), so one request
answers for the whole mesh, strict-mTLS instances included. ``--scrape`` (or a control plane without figures yet)
reads every instance's ``/-/mesh/metrics`` twice instead, which needs an identity for strict instances."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import httpx

from .settings import env_value

HEADER = f"{'SERVICE':16} {'INSTANCES':>9} {'REQ/S':>8} {'SUCCESS':>8} {'P50 MS':>8} {'P99 MS':>8}"


def _row(
    name: str, instances: int, rate: float | None, success: float | None, p50: float | None, p99: float | None
) -> str:
    if not rate or success is None or p50 is None or p99 is None:
        return f"{name:16} {instances:>9} {'-':>8} {'-':>8} {'-':>8} {'-':>8}"
    return f"{name:16} {instances:>9} {rate:>8.1f} {success:>8.1%} {p50:>8.1f} {p99:>8.1f}"


def status(args: argparse.Namespace, control_plane: str, services: dict[str, Any], topology: httpx.Response) -> int:
    if not services:
        print("no registered instances")
    stats = None
    if not args.scrape and topology.status_code == 200:
        stats = topology.json()
        if not any(s.get("requests") for s in stats.get("services", [])) and not stats.get("edges"):
            stats = None  # nothing reported yet (instances report every few seconds): measure directly
    if stats is not None:
        _from_stats(stats, services)
    elif services:
        _from_scrape(args, control_plane, services)
    if args.verbose:
        for name, items in services.items():
            for inst in items:
                tags = ",".join(inst["tags"]) or "-"
                print(
                    f"  {name} {inst['address']}:{inst['port']}  tags={tags}  tls={inst['meta'].get('mesh_tls', '?')}"
                )
    return 0


def _from_stats(stats: dict[str, Any], services: dict[str, Any]) -> None:
    print(f"(figures over the last {stats['window_s']:.0f} s, as reported by the instances)")
    print(HEADER)
    by_name = {s["name"]: s for s in stats["services"]}
    for name in sorted(set(services) | set(by_name)):
        s = by_name.get(name, {})
        count = len(services.get(name, [])) or s.get("instances", 0)
        print(_row(name, count, s.get("rps"), s.get("success"), s.get("p50_ms"), s.get("p99_ms")))
    if stats["edges"]:
        print()
        print(f"{'CALLER -> CALLEE':34} {'REQ/S':>8} {'SUCCESS':>8} {'P50 MS':>8} {'P99 MS':>8}  MTLS")
        for e in stats["edges"]:
            edge = f"{e['source']} -> {e['destination']}"
            figures = _row("", 0, e["rps"], e["success"], e["p50_ms"], e["p99_ms"])[27:]
            print(f"{edge:34}{figures}  {'yes' if e['mtls'] else 'no'}")


def _from_scrape(args: argparse.Namespace, control_plane: str, services: dict[str, Any]) -> None:
    from .telemetry import signals

    context = None
    bootstrap_token = env_value("bootstrap_token")
    if bootstrap_token:  # an identity of our own, to read strict-mTLS instances
        import tempfile

        from .security.identity import Identity
        from .security.spiffe import SpiffeId

        identity = Identity(
            SpiffeId(
                env_value("trust_domain", "mesh.local"),
                env_value("namespace", "default"),
                "meshctl",
            ),
            tempfile.mkdtemp(prefix="meshctl-"),
            control_plane=control_plane,
            bootstrap_token=bootstrap_token,
        )
        identity.refresh()
        context = identity.client
    instances = [inst for items in services.values() for inst in items]
    before, _ = signals.scrape(instances, context)
    time.sleep(args.interval)  # the measuring window for rates
    after, problems = signals.scrape(instances, context)
    rows = {row.service: row for row in signals.between(before, after, args.interval)}
    print(HEADER)
    for name, items in services.items():
        row = rows.get(name)
        if row is None or row.requests == 0:
            print(_row(name, len(items), None, None, None, None))
        else:
            print(_row(name, len(items), row.rate, row.success, row.p50_ms, row.p99_ms))
    for problem in problems:
        print(f"  (no metrics from {problem})", file=sys.stderr)
    strict = [i for i in instances if i["meta"].get("mesh_tls") == "strict"]
    if strict and context is None:
        print(
            f"  ({len(strict)} instance(s) run strict mTLS: set MESH_BOOTSTRAP_TOKEN so meshctl gets an identity "
            "of its own and can read their metrics)",
            file=sys.stderr,
        )
