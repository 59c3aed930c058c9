"""The discovery backend ``MESH_DISCOVERY`` names: ``static:``, ``registry://`` (the control plane's embedded
registry) or ``consul://``."""

from __future__ import annotations

from ..errors import ConfigurationError
from ..settings import MeshSettings, control_plane_verify, registry_of, split_urls
from .base import Discovery
from .static import StaticDiscovery


def _host_port(spec: str, scheme: str) -> str:
    rest = spec[len(scheme) :].strip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(f"MESH_DISCOVERY={spec!r}: expected {scheme}host:port")
    return rest


def make_discovery(settings: MeshSettings) -> Discovery:
    spec = settings.discovery
    if spec.startswith("static:"):
        return StaticDiscovery(spec[len("static:") :])
    if spec.startswith("registry://"):
        from .registry import RegistryDiscovery

        addresses = [_host_port("registry://" + part, "registry://") for part in spec[len("registry://") :].split(",")]
        # the registry lives in the control plane: when that is https:// at the same addresses, so is the registry
        cp = settings.control_plane
        if cp and registry_of(cp) == "registry://" + ",".join(addresses):
            urls = split_urls(cp)
        else:
            urls = tuple(f"http://{address}" for address in addresses)
        return RegistryDiscovery(
            ",".join(urls),
            state_dir=settings.state_dir,
            token=settings.bootstrap_token or None,
            verify=control_plane_verify(settings),
        )
    if spec.startswith("consul://"):
        from .consul import ConsulDiscovery

        rest = spec[len("consul://") :].strip("/")
        scheme = "http"
        if not rest:  # consul:// alone: where Consul's own tools look
            addr = settings.consul_http_addr
            if addr.startswith(("http://", "https://")):
                scheme, _, addr = addr.partition("://")
            rest = addr
        host, port = _host_port("consul://" + rest, "consul://").rsplit(":", 1)
        return ConsulDiscovery(
            host.strip("[]"),
            int(port),
            token=settings.consul_http_token or None,
            scheme=scheme,
            state_dir=settings.state_dir,
        )
    raise ConfigurationError(f"MESH_DISCOVERY={spec!r} is not supported by this build")
