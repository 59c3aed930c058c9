"""meshctl: the command line of the mesh (control plane, rules, status, running apps, the demo)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .cli_diagnostics import add_diagnostics_commands
from .cli_http import DEFAULT_CONTROL_PLANE, CliError, check, control_plane_url, request
from .cli_rules import add_rules_commands
from .cli_tokens import add_token_commands
from .cli_xds import add_xds_commands, print_xds_summary
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
        xds_port=args.xds_port,
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


def cmd_status(args: argparse.Namespace) -> int:
    from .cli_status import status

    rules = check(request(args, "GET", "/v1/rules"))
    registry = check(request(args, "GET", "/v1/registry/services"))
    print(f"control plane {control_plane_url(args)}: rules version {rules['version']}")
    done = status(args, control_plane_url(args), registry["services"], request(args, "GET", "/v1/stats/topology"))
    xds = request(args, "GET", "/v1/xds/clients")
    if xds.status_code == 200:  # a control plane with an xDS port: its clients, and any version one refused
        print_xds_summary(xds.json())
    return done


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
    p.add_argument(
        "--xds-port",
        type=int,
        metavar="PORT",
        help="also serve xDS (ADS, state of the world) to proxyless gRPC clients on this port (0 picks one)",
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

    add_rules_commands(sub)
    add_token_commands(sub)
    add_xds_commands(sub)
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
    from .errors import ConfigurationError, IdentityError

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
    except (CliError, ConfigurationError, IdentityError) as exc:  # each says what to do: one line, no traceback
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
