"""Rules storage: every version kept, compare-and-set writes. SQLite (WAL) by default."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


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

    def summary(self) -> dict[str, Any]:
        return {"version": self.version, "created_at": self.created_at, "author": self.author, "comment": self.comment}


class RulesStore(Protocol):
    def current(self) -> Revision: ...

    def put(self, document: dict[str, Any], cas: int | None, author: str = "", comment: str = "") -> Revision: ...

    def get(self, version: int) -> Revision: ...

    def history(self, limit: int = 100) -> list[Revision]: ...

    def close(self) -> None: ...


EMPTY = Revision(0, {}, 0.0, "", "no rules yet")


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
            "created_at REAL NOT NULL, author TEXT NOT NULL DEFAULT '', comment TEXT NOT NULL DEFAULT '')"
        )

    @staticmethod
    def _row(row: tuple[Any, ...]) -> Revision:
        return Revision(int(row[0]), json.loads(row[1]), float(row[2]), str(row[3]), str(row[4]))

    def current(self) -> Revision:
        with self._lock:
            row = self._db.execute(
                "SELECT version, document, created_at, author, comment FROM rules ORDER BY version DESC LIMIT 1"
            ).fetchone()
        return self._row(row) if row else EMPTY

    def get(self, version: int) -> Revision:
        if version == 0:
            return EMPTY
        with self._lock:
            row = self._db.execute(
                "SELECT version, document, created_at, author, comment FROM rules WHERE version = ?", (version,)
            ).fetchone()
        if row is None:
            raise UnknownVersion(version)
        return self._row(row)

    def put(self, document: dict[str, Any], cas: int | None, author: str = "", comment: str = "") -> Revision:
        text = json.dumps(document, sort_keys=True)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                (current,) = self._db.execute("SELECT COALESCE(MAX(version), 0) FROM rules").fetchone()
                if cas is not None and cas != current:
                    raise CasConflict(cas, current)
                revision = Revision(current + 1, json.loads(text), time.time(), author, comment)
                self._db.execute(
                    "INSERT INTO rules (version, document, created_at, author, comment) VALUES (?, ?, ?, ?, ?)",
                    (revision.version, text, revision.created_at, author, comment),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return revision

    def history(self, limit: int = 100) -> list[Revision]:
        with self._lock:
            rows = self._db.execute(
                "SELECT version, document, created_at, author, comment FROM rules ORDER BY version DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [self._row(r) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
