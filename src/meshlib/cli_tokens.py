"""``meshctl token``: join tokens (an instance's credential) and admin tokens (a team's, for its services' rules),
each scoped to services: create, list, revoke, through the control plane's API."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from .cli_http import CliError, admin_headers, check, print_json, request
from .control.tokens import MAX_TTL
from .rules.checks import parse_duration


def _when(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(epoch)) if epoch else "-"


def parse_ttl(text: str) -> float:
    """``30d``, ``12h``, ``90m``: a rules duration, plus days (tokens live far longer than a timeout)."""
    try:
        if text.endswith("d") and text[:-1].replace(".", "", 1).isdigit():
            seconds = float(text[:-1]) * 86400
            if not 0 < seconds <= MAX_TTL:
                raise ValueError(f"{text!r} is longer than ten years")
            return seconds
        return parse_duration(text, maximum=MAX_TTL)
    except ValueError as exc:
        raise CliError(f"--ttl: {exc} (days are written 30d)") from None


def cmd_token_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"services": args.service, "namespace": args.namespace, "description": args.description}
    if args.admin:
        body["role"] = "admin"
    if args.ttl:
        body["ttl_seconds"] = parse_ttl(args.ttl)
    created = check(request(args, "POST", "/v1/tokens", json=body, headers=admin_headers()))
    if args.output == "json":
        print_json(created)
        return 0
    print(created["token"])
    scope = ", ".join(created["services"])
    if created.get("role") == "admin":
        print(
            f"# admin token {created['id']}: may change the rules of {scope} and nothing else, expires "
            f"{_when(created['expires_at'])}. Give it to the team that owns them, as MESH_ADMIN_TOKEN for meshctl; "
            "it is shown only once.",
            file=sys.stderr,
        )
        return 0
    print(
        f"# join token {created['id']} for {scope} (namespace {created['namespace']}), expires "
        f"{_when(created['expires_at'])}. Set it as MESH_BOOTSTRAP_TOKEN on those instances; it is shown only once.",
        file=sys.stderr,
    )
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    body = check(request(args, "GET", "/v1/tokens", headers=admin_headers()))
    if args.output == "json":
        print_json(body)
        return 0
    print(f"{'ID':12}  {'ROLE':5}  {'STATE':7}  {'NAMESPACE':10}  {'CREATED (UTC)':16}  {'EXPIRES (UTC)':16}  SERVICES")
    for t in body["tokens"]:
        print(
            f"{t['id']:12}  {t.get('role', 'join'):5}  {t['state']:7}  {t['namespace'][:10]:10}  "
            f"{_when(t['created_at']):16}  "
            f"{_when(t['expires_at']):16}  {', '.join(t['services'])}"
        )
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    body = check(request(args, "DELETE", f"/v1/tokens/{args.id}", headers=admin_headers()))
    print(f"{body.get('role', 'join')} token {body['id']} revoked ({', '.join(body['services'])})")
    return 0


def add_token_commands(sub: Any) -> None:
    tokens = sub.add_parser("token", help="join and admin tokens scoped to services (needs MESH_ADMIN_TOKEN)")
    tsub = tokens.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    p = tsub.add_parser("create", help="a join token that may act only as the named service(s)")
    p.add_argument("--service", action="append", required=True, help="a service the token may join as (repeatable)")
    p.add_argument(
        "--admin",
        action="store_true",
        help="an admin token instead: it may change the rules of these services only (for the team owning them)",
    )
    p.add_argument("--namespace", default="default", help="the namespace of its certificates")
    p.add_argument("--ttl", help="how long it stays valid (e.g. 30d); default: until revoked")
    p.add_argument("--description", default="", help="a note kept with the token (who holds it)")
    p.add_argument("-o", "--output", choices=("text", "json"), default="text", help="output format")
    p.set_defaults(func=cmd_token_create)
    p = tsub.add_parser("list", help="every token, with its scope and state (never the secret)")
    p.add_argument("-o", "--output", choices=("text", "json"), default="text", help="output format")
    p.set_defaults(func=cmd_token_list)
    p = tsub.add_parser("revoke", help="stop a token working, at once")
    p.add_argument("id", help="the token's id (meshctl token list)")
    p.set_defaults(func=cmd_token_revoke)
