"""The embedded registry: instances register with a TTL and stay listed while their heartbeats arrive.

One rising index for the whole registry; each service remembers the index of its last change (kept after its
last instance leaves, so a watcher sees the removal).

Ownership: ``register`` hands out a per-instance secret, and only its holder may heartbeat, overwrite or
deregister that id (a shared bootstrap token alone must not let one instance hijack another's entry). Addresses
are validated: unspecified (``0.0.0.0``) and link-local (``169.254.169.254``, the cloud metadata service)
addresses are refused unless the control plane explicitly allows them."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..addresses import UnsafeAddress, normalised
from ..endpoints import WEIGHT_META, ZONE_META, as_weight, zone_problem
from .longpoll import ChangeSignal


class RegistrationError(ValueError):
    pass


class NotOwner(Exception):
    """The request did not carry the secret of the instance it names."""


def secret_digest(secret: str) -> str:
    """What is kept of an instance's secret: SHA-256 (a slow hash adds nothing to 24 random bytes)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def check_owner(instance: Instance, secret: str | None) -> None:
    """NotOwner unless ``secret`` is ``instance``'s."""
    if not secret or not hmac.compare_digest(secret_digest(secret).encode(), instance.digest.encode()):
        raise NotOwner(instance.id)


#: Longest TTL an instance may ask for; a longer one would outlive a crashed instance for hours.
MAX_TTL = 3600.0
_INSTANCE_ID = re.compile(r"^[A-Za-z0-9._:\[\]-]{1,200}$")


def check_address(address: str, allow_unsafe: bool = False) -> str:
    """An IP address (returned in its canonical form, whatever numeric spelling it came in) or a DNS name;
    unspecified, link-local and multicast IPs are refused unless allowed."""
    try:
        return normalised(address, allow_unsafe)
    except UnsafeAddress as exc:
        raise RegistrationError(
            f"address: {exc}; advertise the address callers should connect to (start the control plane with "
            "--allow-unsafe-addresses to accept it)"
        ) from None
    except ValueError as exc:
        raise RegistrationError(f"address: {exc}") from None


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
    #: SHA-256 of the instance's secret (the secret itself is handed to the instance once and never kept).
    digest: str = field(default="", repr=False)

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "service": self.service,
            "address": self.address,
            "port": self.port,
            "tags": self.tags,
            "meta": self.meta,
        }


def parse_registration(body: Any, allow_unsafe_addresses: bool = False) -> Instance:
    from ..rules.checks import parse_duration
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
    address = check_address(address, allow_unsafe_addresses)
    port = body.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise RegistrationError("port: required integer 1-65535")
    tags = body.get("tags", [])
    if not isinstance(tags, list) or len(tags) > 64 or not all(isinstance(t, str) and len(t) <= 256 for t in tags):
        raise RegistrationError("tags: expected a list of at most 64 strings")
    meta = body.get("meta", {})
    if (
        not isinstance(meta, dict)
        or len(meta) > 64
        or not all(isinstance(k, str) and isinstance(v, str) and len(k) + len(v) <= 1024 for k, v in meta.items())
    ):
        raise RegistrationError("meta: expected an object of at most 64 short strings")
    if ZONE_META in meta and (problem := zone_problem(meta[ZONE_META])) is not None:
        raise RegistrationError(f"meta.{ZONE_META}: {problem}")
    if WEIGHT_META in meta:
        try:
            as_weight(meta[WEIGHT_META])
        except ValueError as exc:
            raise RegistrationError(f'meta.{WEIGHT_META}: {exc} (as a string, e.g. "3")') from None
    try:
        ttl = parse_duration(body.get("ttl", "10s"), maximum=MAX_TTL)
    except ValueError as exc:
        raise RegistrationError(f"ttl: {exc}") from None
    instance_id = body.get("id") or f"{service}-{address}-{port}"
    if not isinstance(instance_id, str) or not _INSTANCE_ID.match(instance_id):
        raise RegistrationError("id: expected 1-200 characters of letters, digits and ._:-[]")
    return Instance(instance_id, service, address, port, list(tags), dict(meta), ttl)


_EMPTY_ANSWER = b'{"index": 1, "instances": []}'
#: Changes remembered for waiting watches; a watch that falls further behind checks its names once.
CHANGE_LOG = 4096


class WatchCheck:
    """Has any of ``names`` changed after ``index``? Asked on every registry change by every waiting watch: it
    looks only at the changes made since it last looked (a cursor into ``Registry.changes``), so a change costs
    each waiting watch O(1), not O(names it watches)."""

    def __init__(self, registry: Registry, names: frozenset[str], index: int) -> None:
        self.registry = registry
        self.names = names
        self.index = index
        self.seen = registry.index

    def __call__(self) -> bool:
        registry = self.registry
        if registry.index == self.seen:
            return False
        changes = registry.changes
        if not changes or changes[0][0] > self.seen + 1:  # fell behind the log: check every name once
            self.seen = registry.index
            return bool(registry.changed_since(sorted(self.names), self.index))
        for at, service in reversed(changes):
            if at <= self.seen:
                break
            if service in self.names:
                self.seen = registry.index
                return True
        self.seen = registry.index
        return False


class Registry:
    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._instances: dict[str, Instance] = {}
        self.index = 1
        self._service_index: dict[str, int] = {}
        self.signal = ChangeSignal()
        self._cache: dict[str, tuple[int, bytes]] = {}
        #: The last changes, (index, service), so a waiting watch checks what changed, not every name it watches.
        self.changes: deque[tuple[int, str]] = deque(maxlen=CHANGE_LOG)

    def _changed(self, service: str, index: int | None = None) -> None:
        # a shared registry's index comes from its store; it still never goes backwards here (a store whose index
        # was reset only moves this view forwards by one)
        self.index = index if index is not None and index > self.index else self.index + 1
        self._service_index[service] = self.index
        self.changes.append((self.index, service))
        self._cache.pop(service, None)
        self.signal.fire()

    def _owned(self, instance_id: str, secret: str | None) -> Instance | None:
        """The instance, when ``secret`` is its secret; None when unknown; NotOwner otherwise."""
        instance = self._instances.get(instance_id)
        if instance is None:
            return None
        check_owner(instance, secret)
        return instance

    def register(self, instance: Instance, secret: str | None = None) -> str:
        """Add ``instance`` (a new secret is made), or overwrite it when ``secret`` is the current holder's;
        returns the secret its holder keeps. NotOwner when the id is taken and the secret does not match."""
        old = self._owned(instance.id, secret)
        plain = secret if old is not None and secret else secrets.token_urlsafe(24)
        instance.digest = secret_digest(plain)
        instance.expires_at = self._clock() + instance.ttl
        self._put(instance, old)
        return plain

    def _put(self, instance: Instance, old: Instance | None, index: int | None = None) -> None:
        self._instances[instance.id] = instance
        if old is None or old.public() != instance.public():
            if old is not None and old.service != instance.service:
                self._changed(old.service, index)
            self._changed(instance.service, index)

    def replace(self, instances: dict[str, Instance], index: int) -> None:
        """Make this view hold exactly ``instances`` (a snapshot of a shared registry taken at ``index``, the
        store's own index, so that every replica gives a change the same index); expiry times are kept for the
        instances already held."""
        now = self._clock()
        for instance_id in [i for i in self._instances if i not in instances]:
            gone = self._instances.pop(instance_id)
            self._changed(gone.service, index)
        for instance in instances.values():
            old = self._instances.get(instance.id)
            instance.expires_at = old.expires_at if old is not None else now + instance.ttl
            if old is None or old.public() != instance.public() or old.digest != instance.digest:
                self._put(instance, old, index)

    def owns(self, instance_id: str, secret: str | None) -> bool:
        """``secret`` is the secret of the registered instance ``instance_id``."""
        try:
            return self._owned(instance_id, secret) is not None
        except NotOwner:
            return False

    def get(self, instance_id: str) -> Instance | None:
        return self._instances.get(instance_id)

    def heartbeat(self, instance_id: str, secret: str | None) -> bool:
        """False when unknown (register again); NotOwner without the instance's secret."""
        instance = self._owned(instance_id, secret)
        if instance is None:
            return False
        instance.expires_at = self._clock() + instance.ttl
        return True

    def deregister(self, instance_id: str, secret: str | None) -> bool:
        if self._owned(instance_id, secret) is None:
            return False
        instance = self._instances.pop(instance_id)
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

    def changed_since(self, names: list[str], index: int) -> list[str]:
        """Of ``names``, those whose instances changed after ``index`` (all of them for index 0)."""
        known = self._service_index
        return [n for n in names if known.get(n, 1) > index]

    def watch(self, names: frozenset[str], index: int) -> WatchCheck:
        return WatchCheck(self, names, index)

    def encoded_many(self, names: list[str]) -> bytes:
        """The multiplexed watch answer: the registry's index and, per service, its own answer (each serialised once
        per change and shared by every watcher)."""
        parts = [b'"' + name.encode() + b'": ' + self.encoded(name)[1] for name in names]
        return b'{"index": ' + str(self.index).encode() + b', "services": {' + b", ".join(parts) + b"}}"

    def services(self) -> dict[str, list[Instance]]:
        out: dict[str, list[Instance]] = {}
        for instance in self._instances.values():
            out.setdefault(instance.service, []).append(instance)
        return out

    def encoded(self, service: str) -> tuple[int, bytes]:
        """The watch answer for ``service``, serialised once per change, not once per watcher."""
        import json

        index = self.service_index(service)
        if service not in self._service_index:  # never registered: nothing kept per name (names are untrusted)
            return index, _EMPTY_ANSWER
        cached = self._cache.get(service)
        if cached is not None and cached[0] == index:
            return cached
        body = json.dumps({"index": index, "instances": [i.public() for i in self.instances(service)]}).encode()
        self._cache[service] = (index, body)
        return index, body
