"""Rules storage: every version kept, compare-and-set writes. SQLite (WAL) by default."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .resources import next_versions


class CasConflict(Exception):
    def __init__(self, expected: int, current: int) -> None:
        super().__init__(f"cas={expected} is stale: the current version is {current}")
        self.expected = expected
        self.current = current


class UnknownVersion(KeyError):
    pass


@dataclass(frozen=True, slots=True)
class Revision:
    version: int
    document: dict[str, Any]
    created_at: float
    author: str
    comment: str
    #: Each resource's version: the version that last changed it (see ``resources``); empty for a revision
    #: stored before resources were tracked.
    resources: Mapping[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"version": self.version, "created_at": self.created_at, "author": self.author, "comment": self.comment}


class RulesStore(Protocol):
    def current(self) -> Revision: ...

    def put(self, document: dict[str, Any], cas: int | None, author: str = "", comment: str = "") -> Revision: ...

    def get(self, version: int) -> Revision: ...

    def history(self, limit: int = 100) -> list[Revision]: ...

    def close(self) -> None: ...


EMPTY = Revision(0, {}, 0.0, "", "no rules yet")
_SELECT = "SELECT version, document, created_at, author, comment, resources FROM rules "


class SQLiteRulesStore:
    """One row per version in a WAL-mode SQLite file; survives restarts; writes serialised by an IMMEDIATE
    transaction so two writers cannot both win a compare-and-set."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS rules (version INTEGER PRIMARY KEY, document TEXT NOT NULL, "
            "created_at REAL NOT NULL, author TEXT NOT NULL DEFAULT '', comment TEXT NOT NULL DEFAULT '', "
            "resources TEXT NOT NULL DEFAULT '{}')"
        )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(rules)")}
        if "resources" not in columns:  # a store from before per-service rules: its rows count as untracked
            self._db.execute("ALTER TABLE rules ADD COLUMN resources TEXT NOT NULL DEFAULT '{}'")

    @staticmethod
    def _row(row: tuple[Any, ...]) -> Revision:
        return Revision(int(row[0]), json.loads(row[1]), float(row[2]), str(row[3]), str(row[4]), json.loads(row[5]))

    def current(self) -> Revision:
        with self._lock:
            row = self._db.execute(_SELECT + "ORDER BY version DESC LIMIT 1").fetchone()
        return self._row(row) if row else EMPTY

    def get(self, version: int) -> Revision:
        if version == 0:
            return EMPTY
        with self._lock:
            row = self._db.execute(_SELECT + "WHERE version = ?", (version,)).fetchone()
        if row is None:
            raise UnknownVersion(version)
        return self._row(row)

    def put(self, document: dict[str, Any], cas: int | None, author: str = "", comment: str = "") -> Revision:
        text = json.dumps(document, sort_keys=True)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(_SELECT + "ORDER BY version DESC LIMIT 1").fetchone()
                previous = self._row(row) if row else EMPTY
                if cas is not None and cas != previous.version:
                    raise CasConflict(cas, previous.version)
                version = previous.version + 1
                resources = next_versions(previous, document, version)
                revision = Revision(version, json.loads(text), time.time(), author, comment, resources)
                self._db.execute(
                    "INSERT INTO rules (version, document, created_at, author, comment, resources) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (version, text, revision.created_at, author, comment, json.dumps(resources, sort_keys=True)),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return revision

    def history(self, limit: int = 100) -> list[Revision]:
        with self._lock:
            rows = self._db.execute(
                _SELECT + "ORDER BY version DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [self._row(r) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
