"""``static:`` discovery: a fixed list of endpoints from settings, for tests, scripts and simple deployments."""

from __future__ import annotations

from ..endpoints import Endpoint, EndpointSet
from ..errors import ConfigurationError
from .base import Discovery


def _parse_address(service: str, text: str) -> Endpoint:
    text = text.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ConfigurationError(f"static discovery: {service}: {text!r} is not host:port")
    host = host.strip("[]")
    try:
        port = int(port_text)
        return Endpoint(host, port)
    except ValueError:
        raise ConfigurationError(
            f"static discovery: {service}: {text!r} has an invalid port {port_text!r} (expected 1-65535)"
        ) from None


def parse_static_spec(spec: str) -> dict[str, list[Endpoint]]:
    """``payments=127.0.0.1:8001,127.0.0.1:8002;users=10.0.0.5:80`` to a service → endpoints map."""
    services: dict[str, list[Endpoint]] = {}
    for part in spec.split(";"):
        part = part.strip()
        if not part:
            continue
        name, sep, addresses = part.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigurationError(f"static discovery: {part!r} is not service=host:port[,host:port...]")
        if name in services:
            raise ConfigurationError(f"static discovery: service {name!r} is listed twice")
        services[name] = [_parse_address(name, a) for a in addresses.split(",") if a.strip()]
    return services


class StaticDiscovery(Discovery):
    def __init__(self, services: dict[str, list[Endpoint]] | str) -> None:
        super().__init__()
        if isinstance(services, str):
            services = parse_static_spec(services)
        self._services = {name: list(endpoints) for name, endpoints in services.items()}

    def _start_watch(self, service: str) -> None:
        self.publish(EndpointSet.of(service, self._services.get(service, ())))

    def describe(self) -> str:
        return "static list"

    def known_services(self) -> list[str]:
        return sorted(name for name, endpoints in self._services.items() if endpoints)

    def never_registered(self, service: str) -> bool | None:
        return service not in self._services

    def set(self, service: str, endpoints: list[Endpoint]) -> None:
        """Replace a service's endpoints (pushed to watchers like any discovery change)."""
        self._services[service] = list(endpoints)
        self.publish(EndpointSet.of(service, endpoints))
