"""``meshctl rules``: read and change the rules, per service by default.

``apply -f FILE`` changes only what the file names: each service under ``services`` (its block replaced whole) and
``defaults`` when present; every other service's rules stay as they are. It shows the diff first, applies only
over the versions it showed (``--expect-version`` names one yourself), and refuses the easy mistakes unless
``--force``. ``--replace-all`` replaces the whole document with the file, as before per-service rules.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from .cli_http import CliError, admin_headers, check, print_json, request
from .control.resources import (
    DEFAULTS,
    content_of,
    parse_resource_name,
    resources_of,
    service_of,
    with_changes,
)
from .rules.model import parse_rules, validate_rules
from .rules.review import diff, risks
from .settings import env_value


def _author() -> str:
    """Who applied a change, for the history: ``$MESH_AUTHOR``, else the login name."""
    try:
        return env_value("author") or getpass.getuser()
    except (KeyError, OSError):
        return "admin"


def _label(resource: str) -> str:
    return service_of(resource) or DEFAULTS


def _read(name: str) -> str:
    try:
        return sys.stdin.read() if name == "-" else Path(name).read_text()
    except OSError as exc:
        raise CliError(f"cannot read {name}: {exc.strerror or exc}") from None


def _write_headers(args: argparse.Namespace) -> dict[str, str]:
    headers = {**admin_headers(), "content-type": "application/json", "x-mesh-author": _author()}
    if args.comment:
        headers["x-mesh-comment"] = args.comment
    return headers


def cmd_rules_apply(args: argparse.Namespace) -> int:
    document = parse_rules(_read(args.file), args.file)
    checked = validate_rules(document)  # the same checks the server makes, reported before anything is sent
    state = check(request(args, "GET", "/v1/rules/resources"))
    registered = check(request(args, "GET", "/v1/registry/services")).get("services", {})
    current, version, versions = state["rules"], state["version"], state["resources"]
    expected = args.expect_version if args.expect_version is not None else args.cas
    if args.replace_all:
        return _replace_all(args, document or {}, current, version, registered, expected)
    wanted = resources_of(document)
    if not wanted:
        raise CliError(
            f"the document is empty: {args.file} names no service and no defaults, so there is nothing to apply "
            "(to remove one service's rules: "
            "meshctl rules delete NAME; to replace the whole document with this file: --replace-all)"
        )
    expect = {name: int(versions.get(name, 0)) for name in wanted}
    if expected is not None:
        if len(wanted) != 1:
            raise CliError(
                f"--expect-version names one version, and {args.file} changes {len(wanted)} resources "
                f"({', '.join(_label(r) for r in wanted)}): apply them one file each"
            )
        (only,) = wanted
        if expected != expect[only]:
            raise CliError(
                f"{_label(only)}'s rules are at version {expect[only]}, not {expected}: someone changed them; "
                f"look with meshctl rules history --service {_label(only)}, then apply again"
            )
    proposed = with_changes(current, wanted)
    before = with_changes({}, {name: content_of(current, name) for name in wanted})
    after = with_changes({}, wanted)
    shown = {name: expect[name] for name in wanted}
    changes = diff(before, after, version, "proposed")
    for line in changes or [f"no change: {', '.join(_label(r) for r in wanted)} already say(s) so"]:
        print(line)
    found = risks(current, proposed, registered)
    for risk in found:
        print(f"  warning: {risk}")
    if args.dry_run:
        print(f"dry run: nothing applied (the rules stay at version {version})")
        return 0
    if not changes:
        for warning in checked.warnings:  # what the file still says is worth a look, applied or not
            print(f"  warning: {warning}")
        return 0
    if found and not args.force:
        raise CliError(f"not applied: {len(found)} warning(s) above; fix the file, or pass --force to apply it as is")
    body = check(
        request(
            args,
            "PATCH",
            "/v1/rules",
            content=json.dumps({"resources": wanted, "expect": shown}),
            headers=_write_headers(args),
        )
    )
    _report(body)
    return 0


def _report(body: dict[str, Any]) -> None:
    if not body.get("changed"):
        print(f"no change: the rules stay at version {body['version']}")
        return
    print(f"rules version {body['version']} applied")
    for warning in body.get("warnings", []):
        print(f"  warning: {warning['path']}: {warning['error']}")


def _replace_all(
    args: argparse.Namespace,
    document: dict[str, Any],
    current: dict[str, Any],
    version: int,
    registered: Any,
    expected: int | None,
) -> int:
    """The whole document replaced by the file (services it does not name lose their rules)."""
    if expected is not None and expected != version:
        raise CliError(
            f"the rules are at version {version}, not {expected}: someone changed them; look with "
            "meshctl rules history, then apply again"
        )
    changes = diff(current, document, version)
    for line in changes or [f"no change from version {version}"]:
        print(line)
    found = risks(current, document, registered)
    for risk in found:
        print(f"  warning: {risk}")
    if args.dry_run:
        print(f"dry run: nothing applied (the rules stay at version {version})")
        return 0
    if found and not args.force:
        raise CliError(f"not applied: {len(found)} warning(s) above; fix the file, or pass --force to apply it as is")
    params = {"cas": version if expected is None else expected}
    body = check(
        request(args, "PUT", "/v1/rules", params=params, content=json.dumps(document), headers=_write_headers(args))
    )
    print(f"rules version {body['version']} applied")
    for warning in body.get("warnings", []):
        print(f"  warning: {warning['path']}: {warning['error']}")
    return 0


def _resource_path(args: argparse.Namespace) -> str:
    try:
        resource = parse_resource_name(args.service)
    except ValueError as exc:
        raise CliError(f"--service: {exc}") from None
    return "/v1/rules/defaults" if resource == DEFAULTS else f"/v1/rules/{resource}"


def cmd_rules_delete(args: argparse.Namespace) -> int:
    path = _resource_path(args)
    shown = check(request(args, "GET", path))
    if shown["rules"] is None:
        raise CliError(f"{args.service} has no rules to remove (meshctl rules get shows what there is)")
    for line in diff(with_changes({}, {shown["resource"]: shown["rules"]}), {}, shown["rules_version"], "removed"):
        print(line)
    authz = isinstance(shown["rules"], dict) and shown["rules"].get("authorization")
    if authz and not args.force:
        raise CliError(
            f"not removed: {args.service}'s rules hold an authorization block; every caller would be let in. "
            "Pass --force to remove them anyway"
        )
    params = {"cas": shown["version"]}
    _report(check(request(args, "DELETE", path, params=params, headers=_write_headers(args))))
    return 0


def cmd_rules_validate(args: argparse.Namespace) -> int:
    rules = validate_rules(parse_rules(_read(args.file), args.file))
    print(f"{args.file}: valid ({len(rules.services)} service(s){', defaults' if rules.defaults else ''})")
    for warning in rules.warnings:
        print(f"  warning: {warning}")
    return 0


def cmd_rules_get(args: argparse.Namespace) -> int:
    if args.service:
        if args.version is not None:
            body = check(request(args, "GET", f"/v1/rules/{args.version}"))
            resource = parse_resource_name(args.service)
            content = content_of(body["rules"], resource)
            shown = {"resource": resource, "rules_version": body["version"], "rules": content}
        else:
            shown = check(request(args, "GET", _resource_path(args)))
        if args.output == "json":
            print_json(shown)
            return 0
        print(f"# {_label(shown['resource'])}, as of rules version {shown['rules_version']}")
        content = with_changes({}, {shown["resource"]: shown["rules"]})
        print(yaml.safe_dump(content, sort_keys=False) if content else "{}")
        return 0
    path = f"/v1/rules/{args.version}" if args.version is not None else "/v1/rules"
    body = check(request(args, "GET", path))
    if args.output == "yaml":
        print(f"# version {body['version']}")
        print(yaml.safe_dump(body["rules"], sort_keys=False) if body["rules"] else "{}")
    else:
        print_json(body)
    return 0


def cmd_rules_history(args: argparse.Namespace) -> int:
    if args.service:
        body = check(request(args, "GET", _resource_path(args) + "/history", params={"limit": args.limit}))
        print(f"{'VERSION':>7}  {'WHEN (UTC)':19}  {'ACTION':8}  {'AUTHOR':28}  COMMENT")
        for v in body["versions"]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(v["created_at"]))
            marker = "*" if v["version"] == body["current"] else " "
            print(f"{v['version']:>6}{marker}  {when}  {v['action']:8}  {v['author'][:28]:28}  {v['comment']}")
        return 0
    body = check(request(args, "GET", "/v1/rules/history", params={"limit": args.limit}))
    print(f"{'VERSION':>7}  {'WHEN (UTC)':19}  {'AUTHOR':12}  COMMENT")
    for v in body["versions"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(v["created_at"]))
        marker = "*" if v["version"] == body["current"] else " "
        print(f"{v['version']:>6}{marker}  {when}  {v['author'][:12]:12}  {v['comment']}")
    return 0


def cmd_rules_diff(args: argparse.Namespace) -> int:
    params = {k: v for k, v in (("from", args.from_version), ("to", args.to_version)) if v is not None}
    body = check(request(args, "GET", _resource_path(args) + "/diff", params=params))
    print(body["diff"] or f"no change between versions {body['from']} and {body['to']}")
    return 0


def cmd_rules_rollback(args: argparse.Namespace) -> int:
    if args.service:
        path = _resource_path(args) + "/rollback"
        body = check(request(args, "POST", path, params={"to": args.version}, headers=_write_headers(args)))
        if body.get("changed"):
            print(f"{args.service} rolled back to its rules of version {args.version}: now version {body['version']}")
        else:
            print(f"no change: {args.service}'s rules already are those of version {args.version}")
        return 0
    body = check(request(args, "POST", "/v1/rules/rollback", params={"to": args.version}, headers=admin_headers()))
    print(f"rolled back to version {body['rolled_back_to']}: now version {body['version']}")
    return 0


def add_rules_commands(sub: Any) -> None:
    rules = sub.add_parser("rules", help="read and change the routing rules (per service, or the whole document)")
    rsub = rules.add_subparsers(dest="rules_command", metavar="ACTION", required=True)
    p = rsub.add_parser(
        "apply",
        help="change the services (and defaults) a YAML or JSON file names, showing the diff first "
        "(needs MESH_ADMIN_TOKEN, or an admin token scoped to those services)",
    )
    p.add_argument("-f", "--file", required=True, help="rules file, or - for stdin")
    p.add_argument(
        "--expect-version",
        type=int,
        help="only apply over this version of the one service the file names (with --replace-all: of the whole "
        "document); default: the one the diff was made against; else refused with 409",
    )
    p.add_argument("--cas", type=int, help=argparse.SUPPRESS)  # the earlier name of --expect-version
    p.add_argument("--dry-run", action="store_true", help="show the diff and the warnings; change nothing")
    p.add_argument("--force", action="store_true", help="apply despite the warnings (an empty file, ...)")
    p.add_argument(
        "--replace-all",
        action="store_true",
        help="replace the whole document with the file: services it does not name lose their rules",
    )
    p.add_argument("--comment", default="", help="recorded in the history")
    p.set_defaults(func=cmd_rules_apply)
    p = rsub.add_parser("delete", help="remove one service's rules (or the defaults)")
    p.add_argument("service", help="the service (or defaults)")
    p.add_argument("--force", action="store_true", help="remove them even though they hold an authorization block")
    p.add_argument("--comment", default="", help="recorded in the history")
    p.set_defaults(func=cmd_rules_delete)
    p = rsub.add_parser("validate", help="check a rules file without sending it")
    p.add_argument("-f", "--file", required=True, help="rules file (YAML or JSON)")
    p.set_defaults(func=cmd_rules_validate)
    p = rsub.add_parser("get", help="print the current rules (or one version), or one service's")
    p.add_argument("--service", help="only this service's rules (or defaults)")
    p.add_argument("--version", type=int, dest="version", help="a past version (default: the current one)")
    p.add_argument("-o", "--output", choices=("json", "yaml"), default="yaml", help="output format")
    p.set_defaults(func=cmd_rules_get)
    p = rsub.add_parser("history", help="list stored versions (or those that changed one service)")
    p.add_argument("--service", help="only the versions that changed this service's rules (or defaults)")
    p.add_argument("--limit", type=int, default=20, help="how many versions to list (newest first)")
    p.set_defaults(func=cmd_rules_history)
    p = rsub.add_parser("diff", help="what changed in one service's rules (default: its last change)")
    p.add_argument("service", help="the service (or defaults)")
    p.add_argument("--from", type=int, dest="from_version", help="a rules version (default: before the last change)")
    p.add_argument("--to", type=int, dest="to_version", help="a rules version (default: the current one)")
    p.set_defaults(func=cmd_rules_diff)
    p = rsub.add_parser("rollback", help="make an old version current again (as a new version)")
    p.add_argument("version", type=int, help="the version to make current again (as a new version)")
    p.add_argument("--service", help="only this service's rules, as they were at that version; others untouched")
    p.add_argument("--comment", default="", help="recorded in the history")
    p.set_defaults(func=cmd_rules_rollback)
