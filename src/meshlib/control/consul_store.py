"""Rules in Consul KV, so several config services can run behind one address with no shared disk.

Layout under the prefix: ``current`` holds the current revision; ``versions/<0000000001>`` every version ever
stored. Writes are compare-and-set on ``current``'s ``ModifyIndex`` (Consul answers ``false`` — with 200 — when
another writer got there first); every config service follows ``current`` with a blocking query and pushes what it
sees to its own long-poll watchers.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from ..longpoll import LongPoller
from .resources import next_versions
from .store import EMPTY, CasConflict, Revision, UnknownVersion

log = logging.getLogger("meshlib.control.consul")


class ConsulRulesStore:
    def __init__(
        self, host: str, port: int, *, token: str | None = None, scheme: str = "http", prefix: str = "meshlib/rules"
    ) -> None:
        import consul

        self.client = consul.Consul(host=host, port=port, token=token, scheme=scheme)
        self.prefix = prefix.strip("/")
        self._poller: LongPoller | None = None

    @staticmethod
    def _revision(value: bytes | str | None) -> Revision:
        data = json.loads(value or "null")
        if not isinstance(data, dict):
            return EMPTY
        return Revision(
            int(data["version"]),
            data["document"],
            float(data["created_at"]),
            data["author"],
            data["comment"],
            data.get("resources") or {},
        )

    @staticmethod
    def _encode(revision: Revision) -> str:
        return json.dumps(
            {**revision.summary(), "document": revision.document, "resources": dict(revision.resources)},
            sort_keys=True,
        )

    def _current(self, index: int | None = None, wait: str | None = None) -> tuple[int, int, Revision]:
        """(X-Consul-Index, ModifyIndex of current or 0, revision)."""
        kwargs: dict[str, Any] = {}
        if index is not None:
            kwargs.update(index=index, wait=wait)
        consul_index, item = self.client.kv.get(f"{self.prefix}/current", **kwargs)
        if item is None:
            return int(consul_index or 0), 0, EMPTY
        return int(consul_index), int(item["ModifyIndex"]), self._revision(item["Value"])

    def current(self) -> Revision:
        return self._current()[2]

    def put(self, document: dict[str, Any], cas: int | None, author: str = "", comment: str = "") -> Revision:
        for _ in range(20):
            _, modify_index, current = self._current()
            if cas is not None and cas != current.version:
                raise CasConflict(cas, current.version)
            version = current.version + 1
            resources = next_versions(current, document, version)
            revision = Revision(version, json.loads(json.dumps(document)), time.time(), author, comment, resources)
            encoded = self._encode(revision)
            self.client.kv.put(f"{self.prefix}/versions/{revision.version:010d}", encoded)
            if self.client.kv.put(f"{self.prefix}/current", encoded, cas=modify_index):
                return revision
            # another config service won the race: with cas given that is a conflict, else try on top of theirs
            if cas is not None:
                raise CasConflict(cas, self.current().version)
        raise CasConflict(cas or -1, self.current().version)

    def get(self, version: int) -> Revision:
        if version == 0:
            return EMPTY
        _, item = self.client.kv.get(f"{self.prefix}/versions/{version:010d}")
        if item is None:
            raise UnknownVersion(version)
        return self._revision(item["Value"])

    def history(self, limit: int = 100) -> list[Revision]:
        _, items = self.client.kv.get(f"{self.prefix}/versions/", recurse=True)
        revisions = [self._revision(i["Value"]) for i in items or []]
        return sorted(revisions, key=lambda r: r.version, reverse=True)[:limit]

    def watch(self, on_change: Callable[[Revision], None], wait: float = 30.0) -> None:
        """Follow ``current`` with blocking queries (in a thread); call ``on_change`` with every new revision."""

        def fetch(index: int) -> tuple[int, Any]:
            consul_index, _, revision = self._current(index, f"{wait:g}s")
            return consul_index, revision

        self._poller = LongPoller("consul-rules", fetch, lambda _i, rev: on_change(rev)).start()

    def close(self) -> None:
        if self._poller is not None:
            self._poller.stop()
