"""``meshctl xds``: joining proxyless gRPC clients (any language's gRPC with its built-in xDS client) to the mesh
through the control plane's ADS port (``meshctl serve --xds-port``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .cli_http import CliError, check, print_json, request
from .endpoints import zone_problem
from .settings import env_value


def cmd_xds_bootstrap(args: argparse.Namespace) -> int:
    params: dict[str, str] = {"service": args.service}
    if (args.inbound is None) != (args.app_port is None) or (args.inbound and not (args.envoy and args.identity_dir)):
        raise CliError("--inbound PORT and --app-port PORT go together, with --envoy and --identity-dir")
    if args.envoy:
        params.update(envoy="1", listen=str(args.listen), admin=str(args.admin))
        if args.identity_dir:
            params["identity_dir"] = os.path.abspath(args.identity_dir)
        if args.inbound is not None:
            params.update(inbound=str(args.inbound), app_port=str(args.app_port), inbound_address=args.inbound_address)
    if args.zone and (problem := zone_problem(args.zone)) is not None:
        raise CliError(f"--zone {args.zone!r}: {problem}")
    bootstrap = check(request(args, "GET", "/v1/xds/bootstrap", params=params))
    if args.zone:  # the node's zone: its endpoints come with that zone at priority 0, the others at 1
        bootstrap["node"]["locality"] = {"zone": args.zone}
    if args.envoy:
        if args.identity_dir:
            write_envoy_identity(args, Path(params["identity_dir"]))
        return write_bootstrap(args, bootstrap)
    servers = bootstrap.get("xds_servers") or [{}]
    ads_mtls = any(c.get("type") == "tls" for c in servers[0].get("channel_creds", []))
    if ads_mtls and not args.identity_dir:
        raise CliError(
            "the control plane's xDS port requires mTLS (it runs with --tls): pass --identity-dir DIR, with "
            f"MESH_BOOTSTRAP_TOKEN set to a join token for {args.service}, so that the client has a mesh certificate"
        )
    if args.identity_dir:
        files = write_identity(args, Path(args.identity_dir))
        bootstrap["certificate_providers"] = {
            PROVIDER: {"plugin_name": "file_watcher", "config": {**files, "refresh_interval": "60s"}}
        }
        bootstrap["node"]["metadata"]["mesh.tls"] = "on"
        if ads_mtls:  # the same certificate proves the client to the ADS port (gRFC A65 "tls" channel creds)
            servers[0]["channel_creds"] = [{"type": "tls", "config": dict(files)}]
    return write_bootstrap(args, bootstrap)


def write_bootstrap(args: argparse.Namespace, bootstrap: dict[str, Any]) -> int:
    """The bootstrap to ``--out`` (or standard output): YAML for Envoy, JSON for gRPC."""
    if args.envoy:
        import yaml  # only here: the rest of meshctl never needs it

        text = yaml.safe_dump(bootstrap, sort_keys=False)
    else:
        text = json.dumps(bootstrap, indent=2) + "\n"
    if args.out in (None, "-"):
        sys.stdout.write(text)
        return 0
    path = Path(args.out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None
    if args.envoy:
        print(
            f"wrote {path}: run envoy -c {os.path.abspath(path)} beside {args.service}; its app calls "
            f"http://127.0.0.1:{args.listen} with Host: <service> (admin on 127.0.0.1:{args.admin})"
        )
        if args.inbound is not None:
            print(
                f"mesh callers reach {args.service} through Envoy on {args.inbound_address}:{args.inbound} (mTLS), "
                f"which passes their calls to 127.0.0.1:{args.app_port}: register that address and port as "
                f"instance {bootstrap['node']['id']} of {args.service} (its stats are that instance's) with meta "
                "mesh_tls=strict (PUT /v1/registry/register)"
            )
    else:
        print(f"wrote {path}: run the {args.service} client with GRPC_XDS_BOOTSTRAP={os.path.abspath(path)}")
    return 0


#: The certificate provider instance the control plane's mTLS clusters name (``xds_resources.PROVIDER``).
PROVIDER = "mesh"


def write_identity(args: argparse.Namespace, directory: Path) -> dict[str, str]:
    """A certificate for ``args.service`` from the control plane's CA, signed for the join token in
    ``MESH_BOOTSTRAP_TOKEN``, written as gRPC's ``file_watcher`` provider reads it (the key 0600). gRPC re-reads
    the files every minute: run this again before the certificate expires (24 h by default) to renew it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from .files import write_atomic
    from .security.spiffe import SpiffeId

    token = env_value("bootstrap_token")
    if not token:
        raise CliError(
            f"--identity-dir needs MESH_BOOTSTRAP_TOKEN: a join token for {args.service} "
            f"(meshctl token create --service {args.service})"
        )
    roots = check(request(args, "GET", "/v1/ca/roots"))
    trust_domain = str(roots.get("trust_domain") or "mesh.local")
    identity = SpiffeId(trust_domain, args.namespace, args.service)
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.UniformResourceIdentifier(identity.uri), x509.DNSName(identity.dns_name)]
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, args.service)]))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(key, hashes.SHA256())
    )
    body = {
        "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
        "service": args.service,
        "namespace": args.namespace,
    }
    signed = check(request(args, "POST", "/v1/ca/sign", json=body, headers={"authorization": f"Bearer {token}"}))
    files = {
        "certificate_file": directory / "cert.pem",
        "private_key_file": directory / "key.pem",
        "ca_certificate_file": directory / "ca.pem",
    }
    try:
        directory.mkdir(parents=True, exist_ok=True)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_atomic(files["private_key_file"], key_pem, private=True)
        chain = signed["certificate"] + "".join(signed.get("chain", []))
        write_atomic(files["certificate_file"], chain.encode())
        write_atomic(files["ca_certificate_file"], "".join(roots["roots"]).encode())
    except OSError as exc:
        raise CliError(f"cannot write the identity files in {directory}: {exc.strerror or exc}") from None
    print(f"wrote {identity.uri}'s certificate, key and the mesh roots in {directory}", file=sys.stderr)
    return {name: str(path.resolve()) for name, path in files.items()}


def write_envoy_identity(args: argparse.Namespace, directory: Path) -> None:
    """The certificate files, and beside them the two SDS files Envoy reads them through (it watches the
    directory and reloads a replaced file: run this again to renew, Envoy needs no restart)."""
    from .control.xds_bootstraps import sds_files
    from .files import write_atomic

    write_identity(args, directory)
    try:
        for name, content in sds_files(str(directory)).items():
            write_atomic(directory / name, (json.dumps(content, indent=2) + "\n").encode())
    except OSError as exc:
        raise CliError(f"cannot write the SDS files in {directory}: {exc.strerror or exc}") from None


def cmd_xds_clients(args: argparse.Namespace) -> int:
    answer = check(request(args, "GET", "/v1/xds/clients"))
    if args.output == "json":
        print_json(answer)
        return 0
    clients = answer.get("clients", [])
    if not clients:
        print(f"no xDS client is connected (ADS on port {answer.get('port')})")
    for client in clients:
        refused = {kind: s for kind, s in client.get("types", {}).items() if s.get("parked")}
        print(
            f"{client['node'] or '(no node id)'}: {client['responses']} responses, {client['nacks']} refused"
            + "".join(f"; {kind} {s['parked']} refused: {s['error']}" for kind, s in refused.items())
        )
    return 0


def print_xds_summary(answer: dict[str, Any]) -> None:
    """``meshctl status``'s xDS lines: how many clients, and each refused version with the client's reason."""
    clients = answer.get("clients", [])
    refusing = [c for c in clients if any(s.get("parked") for s in c.get("types", {}).values())]
    print()
    print(f"xDS (ADS port {answer.get('port')}): {len(clients)} client(s), {len(refusing)} refusing a version")
    for client in refusing:
        for kind, state in client["types"].items():
            if state.get("parked"):
                print(
                    f"  {client['node']}: refused {kind} {state['parked']} (keeps {state['acked'] or 'none'}): "
                    f"{state['error']}"
                )


def add_xds_commands(sub: Any) -> None:
    xds = sub.add_parser("xds", help="join proxyless gRPC clients through the control plane's xDS port")
    xsub = xds.add_subparsers(dest="xds_command", metavar="ACTION", required=True)
    p = xsub.add_parser("bootstrap", help="the bootstrap file gRPC's xDS client reads (GRPC_XDS_BOOTSTRAP)")
    p.add_argument("--service", required=True, help="the service the client runs as")
    p.add_argument("-o", "--out", help="the file to write (default: standard output)")
    p.add_argument("--envoy", action="store_true", help="an Envoy sidecar's bootstrap (YAML) instead of gRPC's")
    p.add_argument(
        "--identity-dir",
        help="get a mesh certificate (with the join token in MESH_BOOTSTRAP_TOKEN) into this directory, for mTLS",
    )
    p.add_argument("--namespace", default="default", help="with --identity-dir: the identity's namespace")
    p.add_argument(
        "--zone", default="", help="the node's zone: calls stay in it while it has a healthy instance (as MESH_ZONE)"
    )
    p.add_argument("--listen", type=int, default=15001, help="with --envoy: the port the app's calls go to")
    p.add_argument("--admin", type=int, default=15000, help="with --envoy: Envoy's admin port (on 127.0.0.1)")
    p.add_argument(
        "--inbound",
        type=int,
        metavar="PORT",
        help="with --envoy and --identity-dir: also serve the service's inbound side on PORT (mTLS, authorization)",
    )
    p.add_argument("--inbound-address", default="0.0.0.0", help="with --inbound: the address to listen on")
    p.add_argument("--app-port", type=int, metavar="PORT", help="with --inbound: the app's own port on 127.0.0.1")
    p.set_defaults(func=cmd_xds_bootstrap)
    p = xsub.add_parser("clients", help="the connected xDS clients, with the versions each accepted or refused")
    p.add_argument("-o", "--output", choices=("text", "json"), default="text", help="output format")
    p.set_defaults(func=cmd_xds_clients)
