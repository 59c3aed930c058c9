"""``consul://host:port``: discovery and registration through Consul, the way Consul's docs tell clients to do it.

- One blocking query per *watched* service on ``/v1/health/service/<name>?passing``, started on first use.
- Index rules (in ``LongPoller``): an index that goes backwards resets to 0; below 1 becomes 1; the loop is rate
  limited; errors (500 "No cluster leader", 429/503, refused connections, hangs) back off exponentially.
- A response is not proof of change: snapshots are compared before the balancer hears of them.
- The read timeout is longer than ``wait * 17/16`` (py-consul adds its connect timeout to that).
- ``Service.Address`` empty means the node's address. Tags and meta become the endpoint's (subsets select by them).
- An outage never empties a service: the last endpoints stay in use and are kept in ``MESH_STATE_DIR``; a list
  emptied only because the ACL token may not read it is not believed either.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ..endpoints import (
    MAX_INSTANCES,
    WEIGHT_META,
    EndpointSet,
    SnapshotError,
    UnsafeEndpoint,
    as_weight,
    endpoint_from_fields,
    skip_unsafe,
)
from ..longpoll import LongPoller
from .base import Discovery, Registration

log = logging.getLogger("meshlib.discovery.consul")


class ConsulError(Exception):
    pass


#: Connections kept for blocking queries: one per watched service up to this (requests' default is 10, past which
#: every poll would open and drop a connection).
WATCH_POOL_SIZE = 512
#: Past this many watched services, a warning: each is a thread and a connection (documented in docs/consul.md).
WARN_WATCHES = 256


def _size_pool(client: Any, size: int) -> None:
    import requests.adapters

    session = client.http.session
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)


#: Seconds an agent may take to answer (beyond a blocking query's wait) before the request counts as failed.
AGENT_TIMEOUT = 5.0


def _client(host: str, port: int, token: str | None, scheme: str) -> Any:
    import consul  # py-consul, imported only when Consul is used

    # connections_timeout: how long an agent may stay silent beyond a blocking query's wait (py-consul's default,
    # 30 s, would leave a hung agent unnoticed, and heartbeats blocked, for longer than a TTL)
    return consul.Consul(host=host, port=port, token=token, scheme=scheme, connections_timeout=AGENT_TIMEOUT)


def _endpoints(service: str, entries: Any, index: int) -> EndpointSet:
    """Consul's health entries as a snapshot, validated whole (SnapshotError: the last good one stays)."""
    if not isinstance(entries, list):
        raise SnapshotError(f"expected a list of health entries, got {type(entries).__name__}")
    if len(entries) > MAX_INSTANCES:
        raise SnapshotError(f"{len(entries)} entries is over the limit of {MAX_INSTANCES}")
    endpoints = []
    for i, entry in enumerate(entries):
        svc = entry.get("Service") if isinstance(entry, dict) else None
        node = (entry.get("Node") if isinstance(entry, dict) else None) or {}
        if not isinstance(svc, dict) or not isinstance(node, dict):
            raise SnapshotError(f"entry [{i}] has no Service object")
        try:
            endpoints.append(
                endpoint_from_fields(
                    svc.get("Address") or node.get("Address"),
                    svc.get("Port"),
                    svc.get("Tags"),
                    svc.get("Meta"),
                    svc.get("ID"),
                    _passing_weight(svc.get("Weights")),
                )
            )
        except UnsafeEndpoint as exc:
            skip_unsafe(service, f"entry [{i}]", exc)
        except SnapshotError as exc:
            raise SnapshotError(f"entry [{i}]: {exc}") from None
    return EndpointSet.of(service, endpoints, index)


class ConsulDiscovery(Discovery):
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8500,
        *,
        token: str | None = None,
        scheme: str = "http",
        state_dir: str | None = None,
        wait: float = 30.0,
    ) -> None:
        super().__init__(state_dir, source=f"{scheme}://{host}:{port}")
        self.token = token
        self.wait = wait
        self.client = _client(host, port, token, scheme)
        _size_pool(self.client, WATCH_POOL_SIZE)
        self._endpoint = (host, port, scheme)
        self.address = f"{scheme}://{host}:{port}"
        self.pollers: dict[str, LongPoller] = {}
        self._acl_warned: set[str] = set()

    def _fetch(self, service: str, index: int) -> tuple[int, Any]:
        def callback(response: Any) -> tuple[int, Any]:
            if response.code != 200:
                raise ConsulError(f"consul answered {response.code}: {str(response.body).strip()[:200]}")
            try:
                new_index = int(response.headers["X-Consul-Index"])
            except (KeyError, ValueError):
                raise ConsulError("consul answered without a valid X-Consul-Index header") from None
            filtered = str(response.headers.get("X-Consul-Results-Filtered-By-ACLs", "")).lower() == "true"
            return new_index, (json.loads(response.body or "[]"), filtered)

        params = [("passing", "1"), ("index", str(index)), ("wait", f"{self.wait:g}s")]
        headers = {"X-Consul-Token": self.token} if self.token else {}
        result: tuple[int, Any] = self.client.http.get(
            callback, f"/v1/health/service/{service}", params=params, headers=headers
        )
        return result

    def describe(self) -> str:
        return f"consul at {self.address}"

    def known_services(self) -> list[str]:
        try:
            _, services = self.client.catalog.services(token=self.token)
            return sorted(str(name) for name in services)
        except Exception:  # an error path helper: a failure only means no suggestion
            return super().known_services()

    def _start_watch(self, service: str) -> None:
        def on_answer(index: int, payload: Any) -> None:
            entries, filtered = payload
            snapshot = _endpoints(service, entries, index)
            if filtered and not snapshot.endpoints and self.current(service) is not None:
                if service not in self._acl_warned:
                    self._acl_warned.add(service)
                    log.error(
                        "consul: the ACL token may not read %s (results filtered): keeping its last endpoints", service
                    )
                return
            self.publish_and_save(snapshot)

        poller = LongPoller(
            f"consul-watch-{service}",
            lambda i: self._fetch(service, i),
            on_answer,
            on_error=lambda exc: self.discovery_failed(service, f"consul at {self.address}", exc),
        )
        self.pollers[service] = poller
        if len(self.pollers) == WARN_WATCHES + 1:
            log.warning(
                "consul: watching more than %d services, with one blocking query (a thread and a connection) each; "
                "Consul's HTTP API has no multiplexed watch: consider the embedded registry for gateways",
                WARN_WATCHES,
            )
        poller.start()

    def register(
        self, service: str, address: str, port: int, tags: Sequence[str] = (), meta: Mapping[str, str] | None = None
    ) -> Registration:
        # its own client (its own connection): heartbeats never queue behind the watches' blocking queries
        host, port_, scheme = self._endpoint
        own = _client(host, port_, self.token, scheme)
        return ConsulRegistration(own, service, address, port, list(tags), dict(meta or {}), token=self.token)

    def _stop_watch(self, service: str) -> None:
        poller = self.pollers.pop(service, None)
        if poller is not None:
            poller.stop()

    def close(self) -> None:
        for poller in self.pollers.values():
            poller.stop()


class ConsulRegistration(Registration):
    """A service with a TTL check kept passing by the heartbeat, ``DeregisterCriticalServiceAfter`` as the safety
    net, re-registered when the agent no longer knows the check (agent restart: 404, or 500 on older agents)."""

    def __init__(
        self,
        client: Any,
        service: str,
        address: str,
        port: int,
        tags: list[str],
        meta: dict[str, str],
        *,
        token: str | None = None,
        ttl: float = 10.0,
        deregister_after: str = "1m",
    ) -> None:
        super().__init__()
        self.client = client
        self.service = service
        self.address = address
        self.port = port
        self.tags = tags
        self.meta = meta
        self.token = token
        self.ttl = ttl
        self.deregister_after = deregister_after
        self.id = f"{service}-{address}-{port}"
        self.check_id = f"service:{self.id}"

    def _register(self) -> None:
        self.client.agent.service.register(
            self.service,
            service_id=self.id,
            address=self.address,
            port=self.port,
            tags=self.tags,
            meta=self.meta,
            weights=_weights(self.meta),
            check={"TTL": f"{self.ttl:g}s", "DeregisterCriticalServiceAfter": self.deregister_after},
            token=self.token,
        )
        self.client.agent.check.ttl_pass(self.check_id, token=self.token)

    def _heartbeat(self) -> None:
        import consul

        try:
            known = self.client.agent.check.ttl_pass(self.check_id, token=self.token)
        except (consul.NotFound, consul.ConsulException) as exc:
            if isinstance(exc, consul.ACLPermissionDenied):
                raise
            known, reason = False, str(exc)
        else:
            reason = "404 unknown check"
        if not known:  # py-consul answers False on 404; older agents answer 500
            log.info("consul forgot %s (%s): registering again", self.id, reason)
            self._register()

    def _deregister(self) -> None:
        self.client.agent.service.deregister(self.id, token=self.token)


def _weights(meta: Mapping[str, str]) -> dict[str, int] | None:
    """Consul's own weights for an instance whose meta names a valid ``weight``, so other Consul clients (Consul's
    DNS, Envoy fed by Consul) share traffic the same way."""
    try:
        return {"Passing": as_weight(meta[WEIGHT_META]), "Warning": 1} if WEIGHT_META in meta else None
    except ValueError:
        return None


def _passing_weight(weights: object) -> object:
    """Consul's weight for a passing instance (``Weights.Passing``), or None for the ``weight`` meta to apply: when
    the entry carries none, or Consul's default of 1 (which it fills in for every instance registered without
    weights). The health query asks for passing instances only, so ``Warning`` never applies."""
    passing = weights.get("Passing") if isinstance(weights, dict) else None
    return None if passing is None or passing == 1 else passing
