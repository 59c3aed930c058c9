"""``registry://host:port``: the control plane's embedded registry, followed by long-poll watches.

Last known endpoints are kept on disk, so a client restarted while the registry is down starts from them, and a
registry outage never empties a service."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from ..endpoints import snapshot_from_json
from ..longpoll import LongPoller
from .base import Discovery, Registration

log = logging.getLogger("meshlib.discovery.registry")
WAIT = 30.0


class RegistryDiscovery(Discovery):
    def __init__(self, base_url: str, state_dir: str | None = None, token: str | None = None, wait: float = WAIT):
        super().__init__(state_dir)
        self.base_url = base_url.rstrip("/")
        self.wait = wait
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(5.0, read=wait * 17 / 16 + 5),
            trust_env=False,
        )
        self._pollers: dict[str, LongPoller] = {}
        self._lock = threading.Lock()

    def _start_watch(self, service: str) -> None:
        def fetch(index: int) -> tuple[int, Any]:
            r = self._http.get(f"/v1/registry/services/{service}", params={"index": index, "wait": f"{self.wait}s"})
            r.raise_for_status()
            body = r.json()
            return int(body.get("index", 0)), body

        def on_answer(index: int, body: Any) -> None:
            self.publish_and_save(snapshot_from_json(service, body, index))

        poller = LongPoller(
            f"registry-watch-{service}", fetch, on_answer, on_error=lambda _exc: self.restore_saved(service, "registry")
        )
        with self._lock:
            self._pollers[service] = poller
        poller.start()

    def register(
        self, service: str, address: str, port: int, tags: Sequence[str] = (), meta: Mapping[str, str] | None = None
    ) -> Registration:
        return RegistryRegistration(self._http, service, address, port, list(tags), dict(meta or {}))

    def close(self) -> None:
        with self._lock:
            for poller in self._pollers.values():
                poller.stop()
        self._http.close()


class RegistryRegistration(Registration):
    """Registers with a TTL and heartbeats at a third of it; re-registers when the registry forgot us."""

    def __init__(
        self,
        http: httpx.Client,
        service: str,
        address: str,
        port: int,
        tags: list[str],
        meta: dict[str, str],
        ttl: float = 10.0,
    ) -> None:
        super().__init__()
        self._http = http
        self.ttl = ttl
        self.body = {"service": service, "address": address, "port": port, "tags": tags, "meta": meta, "ttl": f"{ttl}s"}
        self.id = f"{service}-{address}-{port}"
        self.body["id"] = self.id

    def _register(self) -> None:
        self._http.put("/v1/registry/register", json=self.body, timeout=5).raise_for_status()

    def _heartbeat(self) -> None:
        r = self._http.put(f"/v1/registry/heartbeat/{self.id}", timeout=5)
        if r.status_code == 404:
            log.info("registry forgot %s: registering again", self.id)
            self._register()
        else:
            r.raise_for_status()

    def _deregister(self) -> None:
        r = self._http.delete(f"/v1/registry/{self.id}", timeout=5)
        if r.status_code not in (200, 404):
            r.raise_for_status()
