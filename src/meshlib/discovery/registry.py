"""``registry://host:port``: the control plane's embedded registry, followed by one multiplexed long-poll.

Last known endpoints are kept on disk, so a client restarted while the registry is down starts from them, and a
registry outage never empties a service."""

from __future__ import annotations

import logging
import secrets
import ssl
from collections.abc import Mapping, Sequence

import httpx

from ..errors import RegistrationRefused
from ..replicas import ReplicaSet, replica_client
from ..settings import split_urls
from ..wire import SECRET_HEADER, error_text, refusal_text, untrusted
from .base import Discovery, Registration
from .multiwatch import MultiWatch

log = logging.getLogger("meshlib.discovery.registry")
WAIT = 30.0


class RegistryDiscovery(Discovery):
    """Every watched service on one multiplexed long-poll (one connection, one thread); registration and heartbeats
    on a connection of their own, so no amount of watching can delay them."""

    def __init__(
        self,
        base_url: str,
        state_dir: str | None = None,
        token: str | None = None,
        wait: float = WAIT,
        verify: ssl.SSLContext | bool = True,
    ):
        super().__init__(state_dir, source=base_url.rstrip("/"))
        urls = split_urls(base_url)
        self.base_url = ", ".join(urls)
        self.wait = wait
        headers = {"authorization": f"Bearer {token}"} if token else {}
        # several replicas: registration, heartbeats, the watch and its wake-ups move between them together (a
        # watch's session is known to the replica that holds it)
        replicas = ReplicaSet(urls) if len(urls) > 1 else None
        self._http = replica_client(
            urls,
            replicas=replicas,
            headers=headers,
            timeout=httpx.Timeout(5.0),
            trust_env=False,
            verify=verify,
            limits=httpx.Limits(max_connections=2, max_keepalive_connections=1),
        )
        source = f"registry at {self.base_url}"
        self.watcher = MultiWatch(
            urls[0] if replicas is None else replicas,
            headers,
            verify,
            wait,
            self.publish_and_save,
            lambda service, exc: self.discovery_failed(service, source, exc),
            self._wake,
        )

    def describe(self) -> str:
        return f"registry at {self.base_url}"

    def known_services(self) -> list[str]:
        try:
            body = self._http.get("/v1/registry/services", timeout=2.0).json()
            return sorted(str(name) for name in body.get("services", {}))
        except (httpx.HTTPError, ValueError, AttributeError):
            return super().known_services()

    def never_registered(self, service: str) -> bool | None:
        snapshot = self.current(service)
        if snapshot is None:
            return None
        return snapshot.index <= 1  # the registry's index for a name it has never seen

    def _start_watch(self, service: str) -> None:
        self.watcher.add(service)

    def _stop_watch(self, service: str) -> None:
        self.watcher.remove(service)

    def _wake(self, session: str) -> None:
        self._http.post("/v1/registry/watch/wake", params={"session": session}, timeout=2.0)

    def register(
        self, service: str, address: str, port: int, tags: Sequence[str] = (), meta: Mapping[str, str] | None = None
    ) -> Registration:
        return RegistryRegistration(self._http, service, address, port, list(tags), dict(meta or {}))

    def close(self) -> None:
        self.watcher.stop()
        self._http.close()


def _origin(r: httpx.Response) -> str:
    """The replica that answered (with several, not necessarily the first listed)."""
    url = r.request.url
    return f"{url.scheme}://{url.netloc.decode('ascii')}"


class RegistryUnavailable(Exception):
    """The registry could not be reached, or failed: retried in the background."""


class RegistryRegistration(Registration):
    """Registers with a TTL and heartbeats at a third of it; re-registers when the registry forgot us.

    The registry answers a registration with a per-instance secret that heartbeats and deregistration must carry
    (nobody else may touch our entry). When our id is held by someone else (409: a previous run of this instance
    whose TTL has not lapsed yet, or another holder), we register under a fresh id rather than fight over it."""

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
        self.secret: str | None = None

    def _headers(self) -> dict[str, str]:
        return {SECRET_HEADER: self.secret} if self.secret else {}

    credentials = _headers

    def _put(self, path: str, **kwargs: object) -> httpx.Response:
        """A request to the registry; transport errors become one line naming the registry (they are retried)."""
        try:
            return self._http.put(path, timeout=5, **kwargs)  # type: ignore[arg-type]
        except httpx.HTTPError as exc:
            if untrusted(exc):  # the wrong CA file: no retry heals it, so the first registration says so and stops
                raise RegistrationRefused(f"registry at {self._http.base_url}: {error_text(exc)}") from None
            raise RegistryUnavailable(f"registry at {self._http.base_url}: {error_text(exc)}") from None

    def _check(self, r: httpx.Response) -> None:
        if r.status_code in (401, 403):  # a missing or wrong token: retrying cannot help
            raise RegistrationRefused(f"registry at {_origin(r)} refused to register {self.id}: {refusal_text(r)}")
        if r.status_code >= 400:
            raise RegistryUnavailable(f"registry at {_origin(r)} answered {r.status_code}: {refusal_text(r)}")

    def _register(self) -> None:
        r = self._put("/v1/registry/register", json=self.body, headers=self._headers())
        if r.status_code == 409:
            self.id = f"{self.body['service']}-{self.body['address']}-{self.body['port']}-{secrets.token_hex(4)}"
            self.body["id"] = self.id
            log.info("registry: our id is held by another holder; registering as %s", self.id)
            r = self._put("/v1/registry/register", json=self.body)
        self._check(r)
        answer = r.json()
        self.secret = answer.get("secret") if isinstance(answer, dict) else None

    def _heartbeat(self) -> None:
        r = self._put(f"/v1/registry/heartbeat/{self.id}", headers=self._headers())
        if r.status_code == 404 or (r.status_code == 403 and "secret" in refusal_text(r)):
            log.info("registry forgot %s: registering again", self.id)  # a restart, or a TTL that lapsed
            self.secret = None
            self._register()
        else:
            self._check(r)

    def _deregister(self) -> None:
        if self.secret is None:  # never registered (or forgotten): nothing of ours to remove
            return
        try:
            r = self._http.delete(f"/v1/registry/{self.id}", headers=self._headers(), timeout=5)
        except httpx.HTTPError as exc:
            raise RegistryUnavailable(f"registry at {self._http.base_url}: {error_text(exc)}") from None
        if r.status_code != 404:
            self._check(r)
