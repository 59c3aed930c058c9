"""Where registry writes go: straight into this process's registry (the embedded default), or through a store
shared by replicas (``registry_consul.py``). The routes await one of these and never touch the store."""

from __future__ import annotations

from typing import Protocol

from .registry import Instance, Registry


class RegistryBusy(Exception):
    """The shared store could not take the write now (unreachable, or contended): answered 503, and the instance
    retries (on another replica when it knows several)."""


class RegistryWrites(Protocol):
    async def register(self, instance: Instance, secret: str | None) -> str: ...

    async def heartbeat(self, instance_id: str, secret: str | None) -> bool: ...

    async def deregister(self, instance_id: str, secret: str | None) -> bool: ...

    async def expire(self) -> list[str]: ...

    def close(self) -> None: ...


class LocalRegistryWrites:
    """The embedded registry: every write is a dict update on the event loop."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def register(self, instance: Instance, secret: str | None) -> str:
        return self.registry.register(instance, secret)

    async def heartbeat(self, instance_id: str, secret: str | None) -> bool:
        return self.registry.heartbeat(instance_id, secret)

    async def deregister(self, instance_id: str, secret: str | None) -> bool:
        return self.registry.deregister(instance_id, secret)

    async def expire(self) -> list[str]:
        return self.registry.expire()

    def close(self) -> None:
        pass
