"""The registry shared by control-plane replicas through Consul KV (``meshctl serve --store consul://…``).

Layout under the store's prefix:

- ``registry/instances/<id>``: an instance's record (what it registered, its TTL, the SHA-256 of its secret).
  Written on register, deleted on deregister and expiry; every replica follows the prefix with a blocking query
  and serves its long-polls from what it saw, with Consul's index as the registry index, so a watcher that moves
  to another replica keeps a meaningful index.
- ``registry/alive/<id>``: written on every heartbeat (who wrote it and a counter). Nobody follows these keys: a
  replica reads one only when the instance's TTL has lapsed on its own clock, so heartbeats cost one write each
  and no replica downloads the whole registry because one instance is alive.

Any replica takes any instance's writes (the secret is checked against the shared record); writes are
compare-and-set on the record's ``ModifyIndex``, so two replicas cannot both take one id. Expiry: the replica that
took the last heartbeat drops an instance one TTL after it; another replica drops it when the heartbeat key has
not changed over a whole TTL of its own (so within two TTLs when the replica taking its heartbeats died with it).
No wall clock is compared between machines.

Everything read back from Consul is validated as a registration is (bounded, addresses checked with this
replica's own ``--allow-unsafe-addresses``): KV is writable by anyone holding a Consul token for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from ..longpoll import LongPoller
from .registry import Instance, NotOwner, RegistrationError, Registry, check_owner, parse_registration, secret_digest
from .registry_writes import RegistryBusy

log = logging.getLogger("meshlib.control.registry")

#: Largest record kept (a registration is at most a few KiB), and most records followed.
MAX_RECORD_BYTES = 16 * 1024
MAX_RECORDS = 50_000
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
#: How long a write waits for this replica's own view to show it (read-your-writes on one replica).
VIEW_WAIT = 2.0


def encode(instance: Instance) -> str:
    return json.dumps({**instance.public(), "ttl": instance.ttl, "digest": instance.digest}, sort_keys=True)


def decode(raw: bytes | str | None, allow_unsafe_addresses: bool) -> Instance:
    """A record read from Consul, validated like a registration; RegistrationError when it is not one."""
    if raw is None or len(raw) > MAX_RECORD_BYTES:
        raise RegistrationError("missing or oversized record")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise RegistrationError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RegistrationError("not an object")
    digest, ttl = data.pop("digest", None), data.pop("ttl", None)
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise RegistrationError("digest: expected 64 hex digits")
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise RegistrationError("ttl: expected seconds")
    instance = parse_registration({**data, "ttl": f"{float(ttl)}s"}, allow_unsafe_addresses)
    instance.digest = digest
    return instance


class ConsulRegistry:
    """Blocking I/O against Consul (called from worker threads and one follower thread), and the view of the
    registry this replica serves (``view``: touched on the event loop only, through ``publish``)."""

    def __init__(
        self,
        client: Any,
        prefix: str,
        view: Registry,
        *,
        allow_unsafe_addresses: bool = False,
        clock: Callable[[], float] = time.monotonic,
        wait: float = 30.0,
    ) -> None:
        self.kv = client.kv
        self.records = f"{prefix.strip('/')}/registry/instances/"
        self.alive = f"{prefix.strip('/')}/registry/alive/"
        self.view = view
        self.allow_unsafe_addresses = allow_unsafe_addresses
        self.clock = clock
        self.wait = wait
        #: This replica's name in heartbeat keys, and what it last wrote per instance.
        self.replica = secrets.token_hex(4)
        self._beats = 0
        self._wrote: dict[str, str] = {}
        #: Per instance: until when (on our clock) it is known alive, and the heartbeat value seen then.
        self._alive_until: dict[str, float] = {}
        self._alive_seen: dict[str, str | None] = {}
        #: Per instance id: the record's ModifyIndex in the last snapshot (compare-and-set on delete).
        self._modify: dict[str, int] = {}
        self._lock = threading.Lock()
        self._poller: LongPoller | None = None
        self._loaded = 0
        self.snapshots = 0
        self.rejected = 0

    # -- following -------------------------------------------------------------------------------------

    def load(self) -> None:
        """Read the records once before serving (blocking): a replica that starts, or comes back, never answers a
        watch with an empty registry it has not read yet."""
        consul_index, items = self.kv.get(self.records, recurse=True)
        snapshot, modify = self._parse(items or [])
        self.apply(snapshot, modify, int(consul_index or 0))
        self._loaded = int(consul_index or 0)

    def follow(self, publish: Callable[[Callable[[], None]], None]) -> None:
        """Follow the records with blocking queries; each snapshot is applied to the view through ``publish``
        (``loop.call_soon_threadsafe``)."""

        def fetch(index: int) -> tuple[int, Any]:
            kwargs: dict[str, Any] = {"recurse": True}
            if index:
                kwargs.update(index=index, wait=f"{self.wait:g}s")
            consul_index, items = self.kv.get(self.records, **kwargs)
            return int(consul_index or 0), items or []

        def answer(index: int, items: list[dict[str, Any]]) -> None:
            snapshot, modify = self._parse(items)
            publish(lambda: self.apply(snapshot, modify, index))

        poller = LongPoller("registry-follow", fetch, answer)
        poller.index = self._loaded  # from what ``load`` read
        self._poller = poller.start()

    def _parse(self, items: list[dict[str, Any]]) -> tuple[dict[str, Instance], dict[str, int]]:
        snapshot: dict[str, Instance] = {}
        modify: dict[str, int] = {}
        for item in items[:MAX_RECORDS]:
            key = str(item.get("Key", ""))
            try:
                instance = decode(item.get("Value"), self.allow_unsafe_addresses)
            except RegistrationError as exc:
                self.rejected += 1
                log.warning("registry: ignoring Consul key %s: %s", key[:200], exc)
                continue
            if key != self.records + instance.id:
                self.rejected += 1
                log.warning("registry: ignoring Consul key %s: it holds instance %r", key[:200], instance.id)
                continue
            snapshot[instance.id] = instance
            modify[instance.id] = int(item.get("ModifyIndex") or 0)
        if len(items) > MAX_RECORDS:
            log.warning("registry: %d records in Consul; following the first %d", len(items), MAX_RECORDS)
        return snapshot, modify

    def apply(self, snapshot: dict[str, Instance], modify: dict[str, int], index: int) -> None:
        now = self.clock()
        with self._lock:
            for instance_id in [i for i in self._alive_until if i not in snapshot]:
                self._forget(instance_id)
            for instance_id, instance in snapshot.items():
                if self._modify.get(instance_id) != modify[instance_id]:
                    self._alive_until[instance_id] = max(self._alive_until.get(instance_id, 0.0), now + instance.ttl)
            self._modify = modify
        self.view.replace(snapshot, index)
        self.snapshots += 1

    def _forget(self, instance_id: str) -> None:
        self._alive_until.pop(instance_id, None)
        self._alive_seen.pop(instance_id, None)
        self._wrote.pop(instance_id, None)

    # -- writes (worker threads) -----------------------------------------------------------------------

    def _record(self, instance_id: str) -> tuple[Instance | None, int]:
        """The record as Consul holds it now (consistent read), and its ModifyIndex (0: none)."""
        _, item = self.kv.get(self.records + instance_id, consistency="consistent")
        if item is None:
            return None, 0
        try:
            return decode(item.get("Value"), self.allow_unsafe_addresses), int(item["ModifyIndex"])
        except RegistrationError as exc:
            log.warning("registry: record of %s is invalid (%s): it may be overwritten", instance_id[:200], exc)
            return None, int(item["ModifyIndex"])

    def register(self, instance: Instance, secret: str | None) -> str:
        for _ in range(8):
            old, modify = self._record(instance.id)
            if old is not None:
                check_owner(old, secret)
            plain = secret if old is not None and secret else secrets.token_urlsafe(24)
            instance.digest = secret_digest(plain)
            if self.kv.put(self.records + instance.id, encode(instance), cas=modify):
                self._beat(instance)
                return plain
        raise RegistryBusy(f"instance {instance.id!r}: its record kept changing under this write; retry")

    def _beat(self, instance: Instance) -> None:
        # known alive here before the write, in one step with what we write: an expiry pass reading the key in
        # between must see this heartbeat as ours and fresh, never as ours and stale
        with self._lock:
            self._beats += 1
            value = f"{self.replica}:{self._beats}"
            self._wrote[instance.id] = value
            self._alive_until[instance.id] = self.clock() + instance.ttl
        self.kv.put(self.alive + instance.id, value)

    def heartbeat(self, instance_id: str, secret: str | None) -> bool:
        instance = self.view.get(instance_id)
        if instance is None:  # registered on another replica a moment ago, or gone
            instance, _ = self._record(instance_id)
            if instance is None:
                return False
        check_owner(instance, secret)
        self._beat(instance)
        return True

    def deregister(self, instance_id: str, secret: str | None) -> bool:
        for _ in range(8):
            instance, modify = self._record(instance_id)
            if instance is None:
                return False
            check_owner(instance, secret)
            if self.kv.delete(self.records + instance_id, cas=modify):
                self.kv.delete(self.alive + instance_id)
                return True
        raise RegistryBusy(f"instance {instance_id!r}: its record kept changing under this write; retry")

    def expire(self) -> list[str]:
        """Drop the instances nobody heartbeated over a whole TTL (see the module's docstring)."""
        now = self.clock()
        with self._lock:
            due = [i for i, until in self._alive_until.items() if until <= now]
        gone = []
        for instance_id in due:
            instance = self.view.get(instance_id)
            if instance is None:
                continue
            _, item = self.kv.get(self.alive + instance_id)
            value = item["Value"].decode("utf-8", "replace")[:100] if item and item.get("Value") else None
            with self._lock:
                checked = self.clock()
                if self._alive_until.get(instance_id, 0.0) > checked:
                    continue  # a heartbeat came in while we were reading: alive
                seen, wrote = self._alive_seen.get(instance_id, ""), self._wrote.get(instance_id)
                if value is not None and value != wrote and value != seen:
                    # another replica took a heartbeat since we last looked: alive for another TTL
                    self._alive_seen[instance_id] = value
                    self._alive_until[instance_id] = checked + instance.ttl
                    continue
                modify = self._modify.get(instance_id, 0)
            if modify and self.kv.delete(self.records + instance_id, cas=modify):
                self.kv.delete(self.alive + instance_id)
                gone.append(instance_id)
        return gone

    def close(self) -> None:
        if self._poller is not None:
            self._poller.stop()


class ConsulRegistryWrites:
    """The routes' side: each write runs in a worker thread, and answers once this replica's view shows it (a
    client that registers here and then watches here sees itself)."""

    def __init__(self, registry: ConsulRegistry) -> None:
        self.registry = registry

    def follow(self, publish: Callable[[Callable[[], None]], None]) -> None:
        self.registry.follow(publish)

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except (NotOwner, RegistryBusy, RegistrationError):
            raise
        except Exception as exc:  # Consul unreachable, 5xx, ACL: the instance retries, maybe elsewhere
            raise RegistryBusy(f"the shared registry (Consul) failed: {str(exc)[:200] or type(exc).__name__}") from None

    async def _until(self, shown: Callable[[], bool]) -> None:
        view = self.registry.view
        loop = asyncio.get_running_loop()
        deadline = loop.time() + VIEW_WAIT
        while not shown() and (left := deadline - loop.time()) > 0:
            await view.signal.wait(left)

    async def register(self, instance: Instance, secret: str | None) -> str:
        plain: str = await self._call(self.registry.register, instance, secret)
        view = self.registry.view
        await self._until(
            lambda: (
                (held := view.get(instance.id)) is not None
                and held.public() == instance.public()
                and held.digest == instance.digest
            )
        )
        return plain

    async def heartbeat(self, instance_id: str, secret: str | None) -> bool:
        known: bool = await self._call(self.registry.heartbeat, instance_id, secret)
        return known

    async def deregister(self, instance_id: str, secret: str | None) -> bool:
        done: bool = await self._call(self.registry.deregister, instance_id, secret)
        if done:
            await self._until(lambda: self.registry.view.get(instance_id) is None)
        return done

    async def expire(self) -> list[str]:
        gone: list[str] = await self._call(self.registry.expire)
        return gone

    def close(self) -> None:
        self.registry.close()
