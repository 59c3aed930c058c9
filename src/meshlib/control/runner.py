"""Runs the config service: the store, the app, uvicorn (uvloop + httptools when installed)."""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

import uvicorn

from ..errors import ConfigurationError
from ..security.ca import CertificateAuthority
from .app import ControlPlane, build_app
from .store import RulesStore, SQLiteRulesStore

log = logging.getLogger("meshlib.control")


def open_store(spec: str, state_dir: Path) -> RulesStore:
    if spec in ("", "sqlite"):
        return SQLiteRulesStore(state_dir / "rules.db")
    if spec.startswith("sqlite:"):
        return SQLiteRulesStore(spec[len("sqlite:") :])
    if spec.startswith("consul://"):
        from .consul_store import ConsulRulesStore

        address, _, prefix = spec[len("consul://") :].partition("/")
        host, sep, port = (address or os.environ.get("CONSUL_HTTP_ADDR", "127.0.0.1:8500")).rpartition(":")
        if not sep or not port.isdigit():
            raise ConfigurationError(f"--store {spec!r}: expected consul://host:port[/prefix]")
        return ConsulRulesStore(
            host, int(port), token=os.environ.get("CONSUL_HTTP_TOKEN") or None, prefix=prefix or "meshlib/rules"
        )
    raise ConfigurationError(f"--store {spec!r}: expected sqlite, sqlite:PATH or consul://host:port[/prefix]")


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
) -> None:
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    cp = ControlPlane(
        open_store(store, state),
        admin_token=admin_token if admin_token is not None else os.environ.get("MESH_ADMIN_TOKEN"),
        registry_token=registry_token if registry_token is not None else os.environ.get("MESH_BOOTSTRAP_TOKEN"),
        ca=open_ca(state, ca_cert, ca_key, ca_bundle, trust_domain),
    )
    if cp.admin_token is None:
        log.warning("MESH_ADMIN_TOKEN is not set: rule changes are refused until it is")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    config = uvicorn.Config(
        build_app(cp),
        log_level=log_level,
        access_log=False,
        backlog=16384,
        timeout_keep_alive=120,
        timeout_graceful_shutdown=10,
        lifespan="on",
    )
    server = _ControlPlaneServer(config, cp)
    print(
        f"meshctl serve: listening on http://{host}:{bound} (rules version {cp.revision.version}, state in {state})",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.run(sockets=[sock])
    finally:
        cp.store.close()


class _ControlPlaneServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, cp: ControlPlane) -> None:
        super().__init__(config)
        self.cp = cp

    async def shutdown(self, sockets: Any = None) -> None:
        self.cp.release_waiters()  # long-polls would otherwise hold the graceful shutdown for up to their wait
        await super().shutdown(sockets=sockets)
