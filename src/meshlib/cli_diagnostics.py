"""``meshctl diagnostics endpoints <service>``: what every caller's balancer sees of a service's instances (its
latency estimate, attempts in flight, breaker state and the share of its attempts each instance got since its
previous report), as ``linkerd diagnostics endpoints`` shows a proxy's view. Read from the figures instances report
to the control plane, so strict-mTLS callers are included and nothing needs an identity."""

from __future__ import annotations

import argparse
from typing import Any
from urllib.parse import quote

from .cli_http import check, print_json, request


def cmd_diagnostics_endpoints(args: argparse.Namespace) -> int:
    detail = check(request(args, "GET", f"/v1/stats/services/{quote(args.service, safe='')}"))
    rows = detail.get("estimates", [])
    if args.output == "json":
        print_json(rows)
        return 0
    if not rows:
        print(f"no caller of {args.service} has reported its view yet (callers report every few seconds)")
        return 0
    print(f"{'CALLER':28} {'ENDPOINT':24} {'LATENCY MS':>10} {'IN FLIGHT':>9} {'BREAKER':9} {'SHARE':>6}")
    for row in rows:
        print(
            f"{row['caller'][:28]:28} {row['endpoint'][:24]:24} {row['latency_ms']:>10.3f} {row['outstanding']:>9} "
            f"{row['breaker']:9} {row['share']:>6.1%}"
        )
    return 0


def add_diagnostics_commands(sub: Any) -> None:
    diagnostics = sub.add_parser("diagnostics", help="what the data plane sees (balancer estimates per caller)")
    dsub = diagnostics.add_subparsers(dest="diagnostics_command", metavar="ACTION", required=True)
    p = dsub.add_parser(
        "endpoints", help="each caller's latency estimate, in-flight count, breaker and share per instance of a service"
    )
    p.add_argument("service", help="the destination service")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_diagnostics_endpoints)
