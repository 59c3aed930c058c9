"""The embedded registry: instances register with a TTL and stay listed while their heartbeats arrive.

One rising index for the whole registry; each service remembers the index of its last change (kept after its
last instance leaves, so a watcher sees the removal)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .longpoll import ChangeSignal


class RegistrationError(ValueError):
    pass


@dataclass(slots=True)
class Instance:
    id: str
    service: str
    address: str
    port: int
    tags: list[str] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)
    ttl: float = 10.0
    expires_at: float = 0.0

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "service": self.service,
            "address": self.address,
            "port": self.port,
            "tags": self.tags,
            "meta": self.meta,
        }


def parse_registration(body: Any) -> Instance:
    from ..rules.model import parse_duration
    from ..settings import validate_service_name

    if not isinstance(body, dict):
        raise RegistrationError("expected a JSON object")
    unknown = set(body) - {"id", "service", "address", "port", "tags", "meta", "ttl"}
    if unknown:
        raise RegistrationError(f"unknown field(s): {', '.join(sorted(unknown))}")
    service = body.get("service")
    if not isinstance(service, str):
        raise RegistrationError("service: required string")
    try:
        validate_service_name(service)
    except ValueError as exc:
        raise RegistrationError(f"service: {exc}") from None
    address = body.get("address")
    if not isinstance(address, str) or not address:
        raise RegistrationError("address: required string")
    port = body.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise RegistrationError("port: required integer 1-65535")
    tags = body.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise RegistrationError("tags: expected a list of strings")
    meta = body.get("meta", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise RegistrationError("meta: expected an object of strings")
    try:
        ttl = parse_duration(body.get("ttl", "10s"))
    except ValueError as exc:
        raise RegistrationError(f"ttl: {exc}") from None
    instance_id = body.get("id") or f"{service}-{address}-{port}"
    if not isinstance(instance_id, str):
        raise RegistrationError("id: expected a string")
    return Instance(instance_id, service, address, port, list(tags), dict(meta), ttl)


class Registry:
    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._instances: dict[str, Instance] = {}
        self.index = 1
        self._service_index: dict[str, int] = {}
        self.signal = ChangeSignal()
        self._cache: dict[str, tuple[int, bytes]] = {}

    def _changed(self, service: str) -> None:
        self.index += 1
        self._service_index[service] = self.index
        self._cache.pop(service, None)
        self.signal.fire()

    def register(self, instance: Instance) -> Instance:
        instance.expires_at = self._clock() + instance.ttl
        old = self._instances.get(instance.id)
        self._instances[instance.id] = instance
        if old is None or old.public() != instance.public():
            if old is not None and old.service != instance.service:
                self._changed(old.service)
            self._changed(instance.service)
        return instance

    def heartbeat(self, instance_id: str) -> bool:
        instance = self._instances.get(instance_id)
        if instance is None:
            return False
        instance.expires_at = self._clock() + instance.ttl
        return True

    def deregister(self, instance_id: str) -> bool:
        instance = self._instances.pop(instance_id, None)
        if instance is None:
            return False
        self._changed(instance.service)
        return True

    def expire(self) -> list[str]:
        """Drop instances whose TTL lapsed; returns their ids."""
        now = self._clock()
        gone = [i for i in self._instances.values() if i.expires_at <= now]
        for instance in gone:
            del self._instances[instance.id]
            self._changed(instance.service)
        return [i.id for i in gone]

    def service_index(self, service: str) -> int:
        return self._service_index.get(service, 1)

    def instances(self, service: str) -> list[Instance]:
        return sorted((i for i in self._instances.values() if i.service == service), key=lambda i: i.id)

    def services(self) -> dict[str, list[Instance]]:
        out: dict[str, list[Instance]] = {}
        for instance in self._instances.values():
            out.setdefault(instance.service, []).append(instance)
        return out

    def encoded(self, service: str) -> tuple[int, bytes]:
        """The watch answer for ``service``, serialised once per change, not once per watcher."""
        import json

        index = self.service_index(service)
        cached = self._cache.get(service)
        if cached is not None and cached[0] == index:
            return cached
        body = json.dumps({"index": index, "instances": [i.public() for i in self.instances(service)]}).encode()
        self._cache[service] = (index, body)
        return index, body
