"""meshctl: the command line of the mesh (control plane, rules, status, running apps, the demo)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .cli_diagnostics import add_diagnostics_commands
from .cli_http import DEFAULT_CONTROL_PLANE, CliError, admin_headers, check, control_plane_url, print_json, request
from .cli_tokens import add_token_commands
from .settings import env_value

# -- commands -------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from .control.runner import run_control_plane

    run_control_plane(
        host=args.host,
        port=args.port,
        state_dir=args.state_dir,
        store=args.store,
        log_level=args.log_level,
        ca_cert=args.ca_cert,
        ca_key=args.ca_key,
        ca_bundle=args.ca_bundle,
        trust_domain=args.trust_domain,
        insecure=args.insecure,
        allow_unsafe_addresses=args.allow_unsafe_addresses,
        tls=args.tls,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_names=args.tls_name or None,
        header_timeout=args.header_timeout,
        max_header_bytes=args.max_header_bytes,
        max_connections=args.max_connections,
        max_rules_bytes=args.max_rules_bytes,
        allowed_hosts=args.allowed_host,
    )
    return 0


def cmd_ca_init(args: argparse.Namespace) -> int:
    from .security.ca import CertificateAuthority

    ca = CertificateAuthority.init(args.state_dir, args.trust_domain)
    print(
        f"CA created in {args.state_dir} (trust domain {ca.trust_domain}); root expires "
        f"{ca.cert.not_valid_after_utc:%Y-%m-%d}"
    )
    return 0


def cmd_ca_issue(args: argparse.Namespace) -> int:
    """Issue a certificate offline (for MESH_TLS_CERT/KEY/CA, or a client such as curl)."""
    from datetime import timedelta

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from .rules.checks import parse_duration
    from .security.ca import MAX_LEAF_LIFETIME, CertificateAuthority, write_private
    from .settings import validate_service_name

    validate_service_name(args.service)
    ca = CertificateAuthority.load(args.state_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    lifetime = timedelta(seconds=parse_duration(args.lifetime, maximum=MAX_LEAF_LIFETIME.total_seconds()))
    issued = ca.issue(key.public_key(), args.service, args.namespace, lifetime)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key_path = out / f"{args.service}.key"
    write_private(
        key_path,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    (out / f"{args.service}.crt").write_bytes(issued.pem() + issued.chain_pem())
    (out / "ca.crt").write_bytes(ca.roots_pem())
    print(
        f"{out / (args.service + '.crt')}, {key_path}, {out / 'ca.crt'}: "
        f"spiffe://{ca.trust_domain}/ns/{args.namespace}/sa/{args.service}, "
        f"expires {issued.certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    )
    return 0


def cmd_rules_apply(args: argparse.Namespace) -> int:
    """Show what changes (a diff against the rules in force), refuse the easy mistakes unless ``--force``, and
    apply only over the version that was shown (or ``--expect-version``): a change made meanwhile is a 409."""
    from .rules.model import parse_rules, validate_rules
    from .rules.review import diff, risks

    path = Path(args.file)
    try:
        text = sys.stdin.read() if args.file == "-" else path.read_text()
    except OSError as exc:
        raise CliError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    document = parse_rules(text, args.file)
    validate_rules(document)  # the same checks the server makes, reported before anything is sent
    current = check(request(args, "GET", "/v1/rules"))
    registered = check(request(args, "GET", "/v1/registry/services")).get("services", {})
    expected = args.expect_version if args.expect_version is not None else args.cas
    if expected is not None and expected != current["version"]:
        raise CliError(
            f"the rules are at version {current['version']}, not {expected}: someone changed them; look with "
            "meshctl rules history, then apply again"
        )
    changes = diff(current["rules"], document, current["version"])
    for line in changes or [f"no change from version {current['version']}"]:
        print(line)
    found = risks(current["rules"], document, registered)
    for risk in found:
        print(f"  warning: {risk}")
    if args.dry_run:
        print(f"dry run: nothing applied (the rules stay at version {current['version']})")
        return 0
    if found and not args.force:
        raise CliError(f"not applied: {len(found)} warning(s) above; fix the file, or pass --force to apply it as is")
    headers = {**admin_headers(), "content-type": "application/json", "x-mesh-author": _author()}
    if args.comment:
        headers["x-mesh-comment"] = args.comment
    params = {"cas": current["version"] if expected is None else expected}
    body = check(request(args, "PUT", "/v1/rules", params=params, content=json.dumps(document), headers=headers))
    print(f"rules version {body['version']} applied")
    for warning in body.get("warnings", []):
        print(f"  warning: {warning['path']}: {warning['error']}")
    return 0


def _author() -> str:
    """Who applied a change, for the history: ``$MESH_AUTHOR``, else the login name."""
    import getpass

    try:
        return env_value("author") or getpass.getuser()
    except (KeyError, OSError):
        return "admin"


def cmd_rules_validate(args: argparse.Namespace) -> int:
    from .rules.model import parse_rules, validate_rules

    try:
        text = Path(args.file).read_text()
    except OSError as exc:
        raise CliError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    rules = validate_rules(parse_rules(text, args.file))
    print(f"{args.file}: valid ({len(rules.services)} service(s))")
    for warning in rules.warnings:
        print(f"  warning: {warning}")
    return 0


def cmd_rules_get(args: argparse.Namespace) -> int:
    path = f"/v1/rules/{args.version}" if args.version is not None else "/v1/rules"
    body = check(request(args, "GET", path))
    if args.output == "yaml":
        import yaml

        print(f"# version {body['version']}")
        print(yaml.safe_dump(body["rules"], sort_keys=False) if body["rules"] else "{}")
    else:
        print_json(body)
    return 0


def cmd_rules_history(args: argparse.Namespace) -> int:
    body = check(request(args, "GET", "/v1/rules/history", params={"limit": args.limit}))
    print(f"{'VERSION':>7}  {'WHEN (UTC)':19}  {'AUTHOR':12}  COMMENT")
    for v in body["versions"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(v["created_at"]))
        marker = "*" if v["version"] == body["current"] else " "
        print(f"{v['version']:>6}{marker}  {when}  {v['author'][:12]:12}  {v['comment']}")
    return 0


def cmd_rules_rollback(args: argparse.Namespace) -> int:
    body = check(request(args, "POST", "/v1/rules/rollback", params={"to": args.version}, headers=admin_headers()))
    print(f"rolled back to version {body['rolled_back_to']}: now version {body['version']}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .cli_status import status

    rules = check(request(args, "GET", "/v1/rules"))
    registry = check(request(args, "GET", "/v1/registry/services"))
    print(f"control plane {control_plane_url(args)}: rules version {rules['version']}")
    return status(args, control_plane_url(args), registry["services"], request(args, "GET", "/v1/stats/topology"))


def cmd_run(args: argparse.Namespace) -> int:
    import importlib

    from . import serve

    module_name, _, attr = args.app.partition(":")
    if not attr:
        raise CliError(f"{args.app!r}: expected module:attribute, e.g. myapp.main:app")
    sys.path.insert(0, os.getcwd())
    # before the app is imported: a module-level meshlib.Client() then builds the default Mesh under this name
    os.environ["MESH_SERVICE"] = args.service
    try:
        module = importlib.import_module(module_name)
        app = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise CliError(f"cannot load {args.app}: {exc}") from None
    tags = [t for t in (args.tags or "").split(",") if t]
    serve(app, service=args.service, host=args.host, port=args.port, tags=tags, log_level=args.log_level)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(duration=args.duration, ui=not args.no_ui, stay=args.stay)


# -- parser ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshctl", description="Operate a meshlib service mesh.")
    parser.add_argument(
        "--version", action="store_true", dest="show_version", help="print the meshlib version and exit"
    )
    parser.add_argument(
        "--control-plane",
        metavar="URL",
        help=f"config service URL (default: $MESH_CONTROL_PLANE or {DEFAULT_CONTROL_PLANE})",
    )
    parser.add_argument(
        "--ca",
        metavar="FILE",
        help="the CA file an https:// control plane is verified against (default: $MESH_CONTROL_PLANE_CA)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("serve", help="run the control plane (rules, embedded registry)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback by default)")
    p.add_argument("--port", type=int, default=7400, help="0 picks a free port")
    p.add_argument("--state-dir", default=".mesh-state/control-plane", help="where the rules database lives")
    p.add_argument("--store", default="sqlite", help="sqlite (default), sqlite:PATH, consul://host:port[/prefix]")
    p.add_argument("--log-level", default="info", help="debug, info, warning or error")
    p.add_argument("--ca-cert", help="bring your own CA: a root or intermediate certificate (PEM)")
    p.add_argument("--ca-key", help="its private key (PEM, unencrypted)")
    p.add_argument("--ca-bundle", help="the root(s) above an intermediate --ca-cert (PEM)")
    p.add_argument("--trust-domain", default="mesh.local", help="for a CA created on first start")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow listening on a non-loopback address without MESH_BOOTSTRAP_TOKEN (anyone could register)",
    )
    p.add_argument(
        "--allow-unsafe-addresses",
        action="store_true",
        help="accept registrations with unspecified (0.0.0.0) or link-local (169.254.x.x) addresses",
    )
    p.add_argument("--tls", action="store_true", help="serve https with a certificate from the mesh CA")
    p.add_argument("--tls-cert", help="serve https with this certificate chain (PEM) instead")
    p.add_argument("--tls-key", help="the private key of --tls-cert (PEM)")
    p.add_argument("--tls-name", action="append", help="a DNS name or IP for the --tls certificate (repeatable)")
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds to receive a request's headers")
    p.add_argument("--max-header-bytes", type=int, default=64 * 1024, help="larger request headers get 431")
    p.add_argument("--max-connections", type=int, default=16_000, help="concurrent connections before 503")
    p.add_argument("--max-rules-bytes", type=int, default=1 << 20, help="larger rules documents get 413")
    p.add_argument(
        "--allowed-host",
        action="append",
        metavar="NAME",
        help="a host name clients reach this control plane by (repeatable; IP addresses, localhost and this "
        "machine's names always are; '*' for any): other names get 421, against DNS rebinding",
    )
    p.set_defaults(func=cmd_serve)

    ca = sub.add_parser("ca", help="the mesh certificate authority")
    csub = ca.add_subparsers(dest="ca_command", metavar="ACTION", required=True)
    p = csub.add_parser("init", help="create a root CA in the control plane's state directory")
    p.add_argument("--state-dir", default=".mesh-state/control-plane", help="where ca.crt and ca.key are written")
    p.add_argument("--trust-domain", default="mesh.local", help="the SPIFFE trust domain of the new root")
    p.set_defaults(func=cmd_ca_init)
    p = csub.add_parser("issue", help="issue a certificate for a service, offline")
    p.add_argument("service", help="the service the certificate names")
    p.add_argument("--state-dir", default=".mesh-state/control-plane", help="where the CA is (meshctl ca init)")
    p.add_argument("--namespace", default="default", help="the SPIFFE namespace")
    p.add_argument("--lifetime", default="24h", help="how long the certificate is valid (at most 7 days)")
    p.add_argument("--out-dir", default=".", help="where <service>.crt, <service>.key and ca.crt are written")
    p.set_defaults(func=cmd_ca_issue)

    rules = sub.add_parser("rules", help="read and change the routing rules")
    rsub = rules.add_subparsers(dest="rules_command", metavar="ACTION", required=True)
    p = rsub.add_parser(
        "apply", help="replace the rules with a YAML or JSON file, showing the diff first (needs MESH_ADMIN_TOKEN)"
    )
    p.add_argument("-f", "--file", required=True, help="rules file, or - for stdin")
    p.add_argument(
        "--expect-version",
        type=int,
        help="only apply over this version (default: the one the diff was made against); else refused with 409",
    )
    p.add_argument("--cas", type=int, help=argparse.SUPPRESS)  # the earlier name of --expect-version
    p.add_argument("--dry-run", action="store_true", help="show the diff and the warnings; change nothing")
    p.add_argument("--force", action="store_true", help="apply despite the warnings (an empty file, ...)")
    p.add_argument("--comment", default="", help="recorded in the history")
    p.set_defaults(func=cmd_rules_apply)
    p = rsub.add_parser("validate", help="check a rules file without sending it")
    p.add_argument("-f", "--file", required=True, help="rules file (YAML or JSON)")
    p.set_defaults(func=cmd_rules_validate)
    p = rsub.add_parser("get", help="print the current rules (or one version)")
    p.add_argument("--version", type=int, dest="version", help="a past version (default: the current one)")
    p.add_argument("-o", "--output", choices=("json", "yaml"), default="yaml", help="output format")
    p.set_defaults(func=cmd_rules_get)
    p = rsub.add_parser("history", help="list stored versions")
    p.add_argument("--limit", type=int, default=20, help="how many versions to list (newest first)")
    p.set_defaults(func=cmd_rules_history)
    p = rsub.add_parser("rollback", help="make an old version current again (as a new version)")
    p.add_argument("version", type=int, help="the version to make current again (as a new version)")
    p.set_defaults(func=cmd_rules_rollback)

    add_token_commands(sub)
    add_diagnostics_commands(sub)

    p = sub.add_parser("status", help="services, instances, rule version, golden signals")
    p.add_argument("--interval", type=float, default=1.0, help="with --scrape: seconds between the two metric reads")
    p.add_argument(
        "--scrape",
        action="store_true",
        help="read every instance's /-/mesh/metrics instead of the figures instances report to the control plane",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="list every instance")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("run", help="run an ASGI or WSGI app as a mesh instance")
    p.add_argument("service", help="this instance's service name")
    p.add_argument("app", help="module:attribute")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0 picks a free one)")
    p.add_argument("--tags", help="comma-separated tags (subsets select by them)")
    p.add_argument("--log-level", default=env_value("log_level", "info"), help="uvicorn's log level")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="a whole mesh on this machine, with traffic and failure scenes")
    p.add_argument("--duration", type=float, default=60.0, help="seconds (roughly) for the whole demo")
    p.add_argument("--stay", action="store_true", help="after the scenes, keep the mesh, traffic and dashboard up")
    p.add_argument("--no-ui", action="store_true", help="plain log lines instead of the live view")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .errors import ConfigurationError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.show_version:
        from . import __version__

        print(f"meshlib {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # here, so that a reader gone early (| head) is seen below, not at exit
        return code
    except (CliError, ConfigurationError) as exc:
        print(f"meshctl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader of our output left (meshctl rules history | head): not an error; nothing more to write
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
