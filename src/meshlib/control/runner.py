"""Runs the config service: the store, the app, uvicorn (uvloop + httptools when installed)."""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn

from ..errors import ConfigurationError
from ..rules.document import MAX_DOCUMENT_BYTES
from ..security.ca import CertificateAuthority, issue_server_certificate, write_private
from ..security.connection_limits import HEADER_TIMEOUT, MAX_HEADER_BYTES, bounded
from ..settings import env_value
from .app import ControlPlane, build_app
from .hosts import default_hosts
from .registry import Registry
from .registry_writes import RegistryWrites
from .store import RulesStore, SQLiteRulesStore
from .tokens import TokenStore

log = logging.getLogger("meshlib.control")


def consul_target(spec: str) -> tuple[str, int, str] | None:
    """(host, port, prefix) of a ``consul://host:port[/prefix]`` store; None for the other stores."""
    if not spec.startswith("consul://"):
        return None
    address, _, prefix = spec[len("consul://") :].partition("/")
    address = address or env_value("consul_http_addr", "127.0.0.1:8500").removeprefix("http://")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(f"--store {spec!r}: expected consul://host:port[/prefix]")
    return host.strip("[]"), int(port), prefix.strip("/") or "meshlib/rules"


def open_store(spec: str, state_dir: Path) -> RulesStore:
    if spec in ("", "sqlite"):
        return SQLiteRulesStore(state_dir / "rules.db")
    if spec.startswith("sqlite:"):
        return SQLiteRulesStore(spec[len("sqlite:") :])
    target = consul_target(spec)
    if target is not None:
        from .consul_store import ConsulRulesStore

        host, port, prefix = target
        return ConsulRulesStore(host, port, token=env_value("consul_http_token") or None, prefix=prefix)
    raise ConfigurationError(f"--store {spec!r}: expected sqlite, sqlite:PATH or consul://host:port[/prefix]")


def replicated_parts(
    target: tuple[str, int, str], allow_unsafe_addresses: bool
) -> tuple[TokenStore, Callable[[Registry], RegistryWrites]]:
    """The tokens and the registry of a replica: in Consul, beside the rules, under the same prefix (one Consul
    ACL policy on that prefix covers a replica)."""
    import consul

    from .registry_consul import ConsulRegistry, ConsulRegistryWrites
    from .tokens_consul import ConsulTokenStore

    host, port, prefix = target
    client = consul.Consul(host=host, port=port, token=env_value("consul_http_token") or None, connections_timeout=10)
    try:  # one read first, so that an unreachable Consul or a missing ACL is one line naming what to check
        client.kv.get(f"{prefix}/current")
    except Exception as exc:
        raise ConfigurationError(
            f"--store consul://{host}:{port}/{prefix}: cannot read Consul ({str(exc)[:300] or type(exc).__name__}); "
            f"check that the agent is up at {host}:{port} and that CONSUL_HTTP_TOKEN may read and write "
            f"{prefix}/"
        ) from None
    tokens = ConsulTokenStore(client, prefix)

    def registry_writes(view: Registry) -> RegistryWrites:
        registry = ConsulRegistry(client, prefix, view, allow_unsafe_addresses=allow_unsafe_addresses)
        try:
            registry.load()
        except Exception as exc:
            raise ConfigurationError(f"cannot read the registry in Consul ({registry.records}): {exc}") from None
        return ConsulRegistryWrites(registry)

    return tokens, registry_writes


def open_ca(
    state: Path, cert: str | None, key: str | None, bundle: str | None, trust_domain: str
) -> CertificateAuthority:
    """The CA given as files (bring your own), else the one in the state directory, created on first start."""
    if cert or key:
        if not (cert and key):
            raise ConfigurationError("--ca-cert and --ca-key go together")
        return CertificateAuthority.from_files(cert, key, bundle, trust_domain)
    if (state / "ca.key").exists():
        return CertificateAuthority.load(state)
    log.warning("no CA in %s: creating a new root (trust domain %s)", state, trust_domain)
    return CertificateAuthority.init(state, trust_domain)


def run_control_plane(
    *,
    host: str = "127.0.0.1",
    port: int = 7400,
    state_dir: str | Path = ".mesh-state/control-plane",
    store: str = "sqlite",
    admin_token: str | None = None,
    registry_token: str | None = None,
    log_level: str = "info",
    ca_cert: str | None = None,
    ca_key: str | None = None,
    ca_bundle: str | None = None,
    trust_domain: str = "mesh.local",
    insecure: bool = False,
    allow_unsafe_addresses: bool = False,
    tls: bool = False,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_names: list[str] | None = None,
    header_timeout: float = HEADER_TIMEOUT,
    max_header_bytes: int = MAX_HEADER_BYTES,
    max_connections: int = 16_000,
    max_rules_bytes: int = MAX_DOCUMENT_BYTES,
    allowed_hosts: list[str] | None = None,
    xds_port: int | None = None,
) -> None:
    sock = _listen(host, port)  # first: a busy port fails before anything is written to the state directory
    try:
        state = Path(state_dir)
        state.mkdir(parents=True, exist_ok=True)
        registry_token = registry_token if registry_token is not None else env_value("bootstrap_token")
        admin_token = admin_token if admin_token is not None else env_value("admin_token")
        if admin_token and registry_token and admin_token == registry_token:
            raise ConfigurationError(
                "MESH_ADMIN_TOKEN equals MESH_BOOTSTRAP_TOKEN: every instance holds the bootstrap token, so every "
                "instance could change the rules. Give the admin token a value of its own"
            )
        if not registry_token and not admin_token and not _is_loopback_host(host) and not insecure:
            raise ConfigurationError(
                f"refusing to listen on {host} with neither MESH_ADMIN_TOKEN (to create join tokens with meshctl token "
                "create) nor MESH_BOOTSTRAP_TOKEN: nobody could join, and a proxy in front would make every caller "
                "look local. Set MESH_ADMIN_TOKEN, or pass --insecure to accept that"
            )
        if xds_port is not None and not (tls or tls_cert) and not _is_loopback_host(host) and not insecure:
            raise ConfigurationError(
                f"refusing a plaintext --xds-port on {host}: anyone reaching it could read every instance and rule. "
                "Add --tls (the ADS port then requires a mesh certificate of every client), serve it on loopback "
                "(--host 127.0.0.1), or pass --insecure to accept that"
            )
        if (tls_cert or tls_key) and not (tls_cert and tls_key):
            raise ConfigurationError("--tls-cert and --tls-key go together")
        shared = consul_target(store)
        if shared is not None and not (ca_cert and ca_key):
            raise ConfigurationError(
                f"--store {store} shares the rules, registry and tokens between replicas, so every replica must sign "
                "with one CA: pass --ca-cert and --ca-key (the same files, or one mounted secret, on every replica; "
                "meshctl ca init --state-dir DIR writes DIR/ca.crt and DIR/ca.key)"
            )
        ca = open_ca(state, ca_cert, ca_key, ca_bundle, trust_domain)
        tokens: TokenStore = TokenStore(state / "tokens.db")
        registry_writes = None
        if shared is not None:
            tokens, registry_writes = replicated_parts(shared, allow_unsafe_addresses)
        cp = ControlPlane(
            open_store(store, state),
            admin_token=admin_token,
            registry_token=registry_token,
            ca=ca,
            max_rules_bytes=max_rules_bytes,
            allow_unsafe_addresses=allow_unsafe_addresses,
            tokens=tokens,
            registry_writes=registry_writes,
            allowed_hosts=None
            if "*" in (allowed_hosts or ())
            else default_hosts(host, [*(tls_names or ()), *(allowed_hosts or ())]),
        )
        if shared is not None:
            cp.followers = [cp.registry_writes, tokens]
        if cp.admin_token is None:
            log.warning("MESH_ADMIN_TOKEN is not set: rule changes are refused until it is")
        if cp.registry_token is not None:
            log.warning(
                "MESH_BOOTSTRAP_TOKEN is set: development mode, where any holder of that one token may take ANY "
                "service's identity. For a real mesh, give each service its own join token (meshctl token create "
                "--service NAME) and unset MESH_BOOTSTRAP_TOKEN here"
            )
        elif cp.tokens is None or not cp.tokens.active():
            log.warning(
                "no join token exists and MESH_BOOTSTRAP_TOKEN is not set: registry writes are accepted from this "
                "machine (loopback) only, and certificate issuing is off. Create join tokens with meshctl token create "
                "--service NAME (and set each as MESH_BOOTSTRAP_TOKEN on that service's instances)"
            )
        bound = sock.getsockname()[1]
        config = uvicorn.Config(
            build_app(cp),
            log_level=log_level,
            access_log=False,
            backlog=16384,
            timeout_keep_alive=15,
            timeout_graceful_shutdown=10,
            lifespan="on",
            limit_concurrency=max_connections,
        )
        scheme = "http"
        if tls or tls_cert:
            scheme = "https"
            if tls_cert is None or tls_key is None:
                tls_cert, tls_key = _own_certificate(ca, state, tls_names or _default_names(host))
            config.ssl_certfile, config.ssl_keyfile = tls_cert, tls_key
        if xds_port is not None:
            ads_tls = None
            if tls_cert is not None and tls_key is not None:
                ads_tls = (Path(tls_cert).read_bytes(), Path(tls_key).read_bytes(), ca.roots_pem())
            cp.xds = _start_xds(host, xds_port, ads_tls)
        config.load()
        config.http_protocol_class = bounded(config.http_protocol_class, max_header_bytes, header_timeout)
        server = _ControlPlaneServer(config, cp)
        print(
            f"meshctl serve: listening on {scheme}://{host}:{bound} (rules version {cp.revision.version}, "
            f"state in {state})",
            file=sys.stderr,
            flush=True,
        )
        if cp.xds is not None:
            kind = "mTLS, a mesh certificate required" if cp.xds.mtls else "plaintext"
            print(f"meshctl serve: xDS (ADS) on {host}:{cp.xds.port} ({kind})", file=sys.stderr, flush=True)
        try:
            server.run(sockets=[sock])
        finally:
            if cp.xds is not None:
                cp.xds.stop()
            cp.registry_writes.close()
            cp.store.close()
            if cp.tokens is not None:
                cp.tokens.close()

    finally:
        sock.close()


def _start_xds(host: str, port: int, tls: tuple[bytes, bytes, bytes] | None = None) -> Any:
    """The ADS server on its own port (``xds_server.py``); one line naming what is missing otherwise."""
    try:
        from .xds_server import XdsServer
    except ImportError as exc:
        raise ConfigurationError(
            f"--xds-port needs grpcio and Envoy's protos ({exc.name} is missing): pip install 'meshlib[xds]'"
        ) from None
    xds = XdsServer()
    try:
        xds.start(host, port, tls)
    except OSError as exc:
        raise ConfigurationError(str(exc)) from None
    return xds


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigurationError(
                f"cannot listen on {host}:{port}: the port is in use (another meshctl serve?); stop what holds it, "
                "or pass --port (0 picks a free one)"
            ) from None
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (check --host)") from None
    return sock


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _default_names(host: str) -> list[str]:
    names = ["localhost", "127.0.0.1", "::1"]
    if host not in ("0.0.0.0", "::", "") and host not in names:
        names.insert(0, host)
    elif host in ("0.0.0.0", "::"):
        names.append(socket.gethostname())
    return names


def _own_certificate(ca: CertificateAuthority, state: Path, names: list[str]) -> tuple[str, str]:
    """A server certificate for this control plane from its own CA (kept in the state directory), so instances
    verify it with the mesh root (``MESH_CONTROL_PLANE_CA``)."""
    cert_pem, key_pem = issue_server_certificate(ca, names)
    cert_path, key_path = state / "control-plane.crt", state / "control-plane.key"
    write_private(key_path, key_pem)
    cert_path.write_bytes(cert_pem)
    (state / "ca-roots.pem").write_bytes(ca.roots_pem())
    log.info(
        "https: certificate for %s from the mesh CA; clients verify with %s", ", ".join(names), state / "ca-roots.pem"
    )
    return str(cert_path), str(key_path)


class _ControlPlaneServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, cp: ControlPlane) -> None:
        super().__init__(config)
        self.cp = cp

    async def shutdown(self, sockets: Any = None) -> None:
        self.cp.release_waiters()  # long-polls would otherwise hold the graceful shutdown for up to their wait
        await super().shutdown(sockets=sockets)
