"""Join and admin tokens shared by control-plane replicas through Consul KV (``--store consul://…``): one key per
token under ``<prefix>/tokens/``, written compare-and-set, followed by every replica with a blocking query, so a
token created on one replica works on all of them and a revocation reaches all of them within a blocking query's
round trip. Checks are still served from memory. Records read back are validated (KV is writable by anyone holding
a Consul token for it): a malformed one is ignored, never trusted."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import ConfigurationError
from ..longpoll import LongPoller
from ..settings import validate_service_name
from .tokens import MAX_SERVICES, MAX_TOKENS, ROLES, StoreUnavailable, TokenRecord, TokenStore

log = logging.getLogger("meshlib.control.tokens")

_ID = re.compile(r"^[0-9a-f]{12}$")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
MAX_RECORD_BYTES = 8 * 1024


def encode(record: TokenRecord) -> str:
    return json.dumps(
        {
            "id": record.id,
            "digest": record.digest,
            "services": list(record.services),
            "namespace": record.namespace,
            "created_at": record.created_at,
            "expires_at": record.expires_at,
            "revoked_at": record.revoked_at,
            "description": record.description,
            "role": record.role,
        },
        sort_keys=True,
    )


def _time(value: Any, optional: bool) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("expected a time")
    return float(value)


def decode(raw: bytes | str | None) -> TokenRecord:
    """A record read from Consul; ValueError naming what is wrong."""
    if raw is None or len(raw) > MAX_RECORD_BYTES:
        raise ValueError("missing or oversized record")
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("not an object")
    token_id, digest, services = data.get("id"), data.get("digest"), data.get("services")
    if not isinstance(token_id, str) or not _ID.match(token_id):
        raise ValueError("id: expected 12 hex digits")
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise ValueError("digest: expected 64 hex digits")
    if not isinstance(services, list) or not 0 < len(services) <= MAX_SERVICES:
        raise ValueError("services: expected a list of names")
    try:
        names = tuple(validate_service_name(n) if isinstance(n, str) else "" for n in services)
        raw_namespace = data.get("namespace")
        namespace = validate_service_name(raw_namespace if isinstance(raw_namespace, str) else "")
    except ConfigurationError as exc:
        raise ValueError(str(exc)) from None
    if "" in names:
        raise ValueError("services: expected names")
    description, role = data.get("description", ""), data.get("role")
    if not isinstance(description, str) or len(description) > 256:
        raise ValueError("description: expected a short string")
    if role not in ROLES:
        raise ValueError("role: unknown")
    return TokenRecord(
        token_id,
        digest,
        names,
        namespace,
        _time(data.get("created_at"), False) or 0.0,
        _time(data.get("expires_at"), True),
        _time(data.get("revoked_at"), True),
        description,
        str(role),
    )


class ConsulTokenStore(TokenStore):
    def __init__(self, client: Any, prefix: str, clock: Any = time.time, wait: float = 30.0) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.kv = client.kv
        self.keys = f"{prefix.strip('/')}/tokens/"
        self.wait = wait
        self._poller: LongPoller | None = None
        self.rejected = 0
        try:
            _, items = self.kv.get(self.keys, recurse=True)
        except Exception as exc:
            raise ConfigurationError(f"cannot read the tokens in Consul ({self.keys}): {exc}") from None
        self._records = self._parse(items or [])

    def _parse(self, items: list[dict[str, Any]]) -> dict[str, TokenRecord]:
        records: dict[str, TokenRecord] = {}
        for item in items[:MAX_TOKENS]:
            key = str(item.get("Key", ""))
            try:
                record = decode(item.get("Value"))
                if key != self.keys + record.id:
                    raise ValueError(f"it holds token {record.id}")
            except (ValueError, RecursionError) as exc:
                self.rejected += 1
                log.warning("tokens: ignoring Consul key %s: %s", key[:200], str(exc)[:200])
                continue
            records[record.id] = record
        return records

    def follow(self, publish: Callable[[Callable[[], None]], None] | None = None) -> None:
        """Follow the tokens with blocking queries (in a thread); a check reads whichever dict is current."""

        def fetch(index: int) -> tuple[int, Any]:
            kwargs: dict[str, Any] = {"recurse": True}
            if index:
                kwargs.update(index=index, wait=f"{self.wait:g}s")
            consul_index, items = self.kv.get(self.keys, **kwargs)
            return int(consul_index or 0), items or []

        def answer(_index: int, items: list[dict[str, Any]]) -> None:
            records = self._parse(items)
            with self._lock:
                self._records = records

        self._poller = LongPoller("tokens-follow", fetch, answer).start()

    def _insert(self, record: TokenRecord) -> None:
        try:
            stored = self.kv.put(self.keys + record.id, encode(record), cas=0)
        except Exception as exc:
            raise StoreUnavailable(f"cannot store the token in Consul: {exc}") from None
        if not stored:
            raise StoreUnavailable("a token with this id exists already (retry)")
        with self._lock:
            self._records = {**self._records, record.id: record}

    def _store_revoked(self, record: TokenRecord) -> None:
        try:
            self.kv.put(self.keys + record.id, encode(record))
        except Exception as exc:
            raise StoreUnavailable(f"cannot store the revocation in Consul: {exc}") from None

    def close(self) -> None:
        if self._poller is not None:
            self._poller.stop()
