"""MeshSettings: explicit arguments first, then ``MESH_*`` environment variables, then defaults (design §3)."""

from __future__ import annotations

import os
import re
import ssl
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from urllib.parse import urlsplit

from .appname import default_service
from .endpoints import zone_problem
from .errors import ConfigurationError

TLS_MODES = ("off", "permissive", "strict")
_HEADER_NAME = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")
_SERVICE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def is_service_name(name: str) -> bool:
    return len(name) <= 63 and _SERVICE_NAME.match(name) is not None


def validate_service_name(name: str) -> str:
    """Service names become hostnames and SPIFFE path segments: DNS-label rules."""
    if not _SERVICE_NAME.match(name):
        raise ConfigurationError(
            f"invalid service name {name!r}: use lowercase letters, digits and '-', 1-63 characters"
        )
    return name


def _default_service() -> str:
    return default_service(sys.argv, os.getcwd())


def split_urls(value: str) -> tuple[str, ...]:
    """``"http://a:7400, http://b:7400/"`` as ``("http://a:7400", "http://b:7400")``; empty parts dropped."""
    return tuple(part.strip().rstrip("/") for part in value.split(",") if part.strip())


def control_plane_urls(value: str, variable: str = "MESH_CONTROL_PLANE") -> tuple[str, ...]:
    """The replicas' URLs in ``value`` (one, or several separated by commas), or ConfigurationError naming what is
    wrong: each an http(s) URL with a host, none listed twice, all under one path."""
    urls = split_urls(value)
    if not urls:
        raise ConfigurationError(f"{variable}={value!r}: expected an http(s):// URL, or several separated by commas")
    paths = set()
    for url in urls:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            raise ConfigurationError(f"{variable}: {url!r}: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigurationError(
                f"{variable}={value!r}: expected an http(s):// URL"
                + (", or several separated by commas" if len(urls) == 1 else f"; {url!r} is not one")
            )
        paths.add(parts.path.rstrip("/"))
    if len(set(urls)) != len(urls):
        raise ConfigurationError(f"{variable}={value!r}: a replica is listed twice")
    if len(paths) > 1:
        raise ConfigurationError(f"{variable}={value!r}: every replica must be served under the same path")
    return urls


def registry_of(control_plane: str) -> str:
    """``registry://host:port`` of the embedded registry in the control plane at ``control_plane``
    (``registry://a:7400,b:7400`` for several replicas)."""
    addresses = []
    for url in split_urls(control_plane) or (control_plane,):
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host = parts.hostname or "127.0.0.1"
        addresses.append(f"{f'[{host}]' if ':' in host else host}:{port}")
    return "registry://" + ",".join(addresses)


def _flag(var: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "on", "yes"):
        return True
    if lowered in ("0", "false", "off", "no", ""):
        return False
    raise ConfigurationError(f"{var}={value!r}: expected on or off")


@dataclass(frozen=True, slots=True)
class MeshSettings:
    service: str = field(default_factory=_default_service)
    discovery: str = "registry://127.0.0.1:7400"
    control_plane: str = "http://127.0.0.1:7400"
    tls: str = "off"
    state_dir: str = ""
    trust_domain: str = "mesh.local"
    namespace: str = "default"
    #: How long a first call waits for discovery's first answer about a service.
    discovery_timeout: float = 5.0
    #: Traces and metrics (``MESH_TELEMETRY=off`` turns both off, for the last microseconds).
    telemetry: bool = True
    #: JSON access log lines on the ``meshlib.access`` logger, and the share of requests logged.
    access_log: bool = False
    access_log_sample: float = 1.0
    #: A CA file (PEM) to verify an https:// control plane and registry with (else the system's roots).
    control_plane_ca: str = ""
    #: Inbound headers forwarded on outbound mesh calls made while handling the request (comma-separated names).
    propagate_headers: str = ""
    #: A service not called for this long stops being watched (its state is dropped; the next call watches again).
    watch_idle_timeout: float = 600.0
    #: Gets this instance its certificate from the control plane's CA, and lets it register.
    bootstrap_token: str = field(default="", repr=False)
    #: Certificate, key and roots from files (users with their own PKI), and the lifetime asked of the mesh CA.
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    tls_cert_lifetime: str = ""
    #: Where ``consul://`` (without an address) looks, and its ACL token: as Consul's own tools read them.
    consul_http_addr: str = "127.0.0.1:8500"
    consul_http_token: str = field(default="", repr=False)
    #: Seconds between golden-signal reports to the control plane's dashboard (0: never report).
    stats_interval: float = 2.0
    #: This process's zone: its calls prefer instances in the same zone while any is healthy, and the instances
    #: it serves register in it ("": no zone, every instance is equal).
    zone: str = ""

    _ENV = {
        "service": "MESH_SERVICE",
        "discovery": "MESH_DISCOVERY",
        "control_plane": "MESH_CONTROL_PLANE",
        "tls": "MESH_TLS",
        "state_dir": "MESH_STATE_DIR",
        "trust_domain": "MESH_TRUST_DOMAIN",
        "namespace": "MESH_NAMESPACE",
        "telemetry": "MESH_TELEMETRY",
        "access_log": "MESH_ACCESS_LOG",
        "access_log_sample": "MESH_ACCESS_LOG_SAMPLE",
        "control_plane_ca": "MESH_CONTROL_PLANE_CA",
        "propagate_headers": "MESH_PROPAGATE_HEADERS",
        "bootstrap_token": "MESH_BOOTSTRAP_TOKEN",
        "tls_cert": "MESH_TLS_CERT",
        "tls_key": "MESH_TLS_KEY",
        "tls_ca": "MESH_TLS_CA",
        "tls_cert_lifetime": "MESH_TLS_CERT_LIFETIME",
        "consul_http_addr": "CONSUL_HTTP_ADDR",
        "consul_http_token": "CONSUL_HTTP_TOKEN",
        "stats_interval": "MESH_STATS_INTERVAL",
        "zone": "MESH_ZONE",
    }

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> MeshSettings:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for name, var in cls._ENV.items():
            if var in env:
                values[name] = env[var]
        values.update({k: v for k, v in overrides.items() if v is not None})
        control_plane = values.get("control_plane")
        if "discovery" not in values and isinstance(control_plane, str) and control_plane:
            # one variable per decision: moving the control plane moves its registry too
            values["discovery"] = registry_of(control_plane)
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigurationError(f"unknown mesh setting(s): {', '.join(sorted(unknown))}")
        for name in ("telemetry", "access_log"):
            if isinstance(values.get(name), str):
                values[name] = _flag(cls._ENV[name], str(values[name]))
        if isinstance(values.get("access_log_sample"), str):
            raw = str(values["access_log_sample"])
            try:
                values["access_log_sample"] = float(raw)
            except ValueError:
                raise ConfigurationError(f"MESH_ACCESS_LOG_SAMPLE={raw!r}: expected a number from 0 to 1") from None
        if isinstance(values.get("stats_interval"), str):
            raw = str(values["stats_interval"])
            try:
                values["stats_interval"] = float(raw)
            except ValueError:
                raise ConfigurationError(
                    f"MESH_STATS_INTERVAL={raw!r}: expected seconds (0 turns reports off)"
                ) from None
        settings = cls(**values)  # type: ignore[arg-type]
        return settings.validated()

    @property
    def propagated_names(self) -> tuple[str, ...]:
        return tuple(n.strip().lower() for n in self.propagate_headers.split(",") if n.strip())

    def validated(self) -> MeshSettings:
        validate_service_name(self.service)
        if self.zone and (problem := zone_problem(self.zone)) is not None:
            raise ConfigurationError(f"MESH_ZONE={self.zone!r}: {problem}")
        if self.tls not in TLS_MODES:
            raise ConfigurationError(f"MESH_TLS={self.tls!r}: expected one of {', '.join(TLS_MODES)}")
        if not self.discovery.startswith(("static:", "registry://", "consul://")):
            raise ConfigurationError(
                f"MESH_DISCOVERY={self.discovery!r}: expected consul://host:port, registry://host:port "
                "or static:service=host:port[,...][;service=...]"
            )
        if self.control_plane:
            control_plane_urls(self.control_plane)
        if self.control_plane_ca and not Path(self.control_plane_ca).is_file():
            raise ConfigurationError(
                f"MESH_CONTROL_PLANE_CA={self.control_plane_ca!r}: no such file (a PEM file of the CA that signed the "
                "control plane's certificate; meshctl serve --tls writes it as ca-roots.pem in its state directory)"
            )
        for name in self.propagated_names:
            if not _HEADER_NAME.match(name):
                raise ConfigurationError(
                    f"MESH_PROPAGATE_HEADERS={self.propagate_headers!r}: {name!r} is not a header name"
                )
        if not 0.0 <= self.access_log_sample <= 1.0:
            raise ConfigurationError(f"MESH_ACCESS_LOG_SAMPLE={self.access_log_sample}: must be from 0 to 1")
        if not (self.stats_interval == 0 or 0.2 <= self.stats_interval <= 3600):
            raise ConfigurationError(
                f"MESH_STATS_INTERVAL={self.stats_interval}: expected 0 (off) or 0.2 to 3600 seconds"
            )
        state_dir = self.state_dir or str(Path.home() / ".cache" / "meshlib" / self.service)
        return replace(self, state_dir=state_dir)


#: Variables read by the tools that build no Mesh (meshctl, the control plane), named here with the rest.
TOOL_ENV = {
    "admin_token": "MESH_ADMIN_TOKEN",
    "author": "MESH_AUTHOR",
    "log_level": "MESH_LOG_LEVEL",
    "demo_keep": "MESHLIB_DEMO_KEEP",
}


def env_value(name: str, default: str = "", environ: Mapping[str, str] | None = None) -> str:
    """One variable by its setting's name (``"bootstrap_token"`` reads ``MESH_BOOTSTRAP_TOKEN``), unvalidated:
    for the command-line tools and the control plane. A Mesh reads its own through ``MeshSettings.from_env``."""
    var = MeshSettings._ENV.get(name) or TOOL_ENV[name]
    return (os.environ if environ is None else environ).get(var, default)


def control_plane_verify(settings: MeshSettings) -> ssl.SSLContext | bool:
    """How to verify an https:// control plane or registry: against ``MESH_CONTROL_PLANE_CA`` when set, else the
    system's roots (plain http:// ignores it)."""
    if not settings.control_plane_ca:
        return True
    try:
        return ssl.create_default_context(cafile=settings.control_plane_ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"MESH_CONTROL_PLANE_CA={settings.control_plane_ca!r}: not a usable CA file ({exc})"
        ) from None
