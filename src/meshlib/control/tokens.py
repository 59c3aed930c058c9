"""Join tokens scoped to service names, as Consul scopes an ACL token to ``service:write`` for one name.

A join token lets an instance get a certificate for, register, heartbeat and report stats as the services it
names (in one namespace) and nothing else, so one compromised instance cannot take another service's identity.
Tokens are stored hashed (SHA-256 of 32 random bytes: a slow hash adds nothing against a secret of that
entropy), have an optional time to live, and can be revoked; every check is served from memory.

The wire form is ``mjt.<id>.<secret>``: the id finds the record without comparing against every hash, the
secret is compared in constant time.

A token has one role. A *join* token is an instance's credential (above). An *admin* token scoped to services lets
a team change those services' rules and nothing else (no other service's rules, no defaults, no tokens): one team's
leaked token cannot reroute or open up another team's service. Neither role can act as the other."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError
from ..settings import validate_service_name

PREFIX = "mjt"
#: Most services one token may name, and most tokens a control plane keeps (revoked and expired ones included).
MAX_SERVICES = 64
MAX_TOKENS = 10_000
#: Longest time to live of a token, in seconds (ten years).
MAX_TTL = 10 * 365 * 86400.0
JOIN = "join"
ADMIN = "admin"
ROLES = (JOIN, ADMIN)


class TokenError(ValueError):
    """A token request is invalid (the message says which field)."""


class StoreUnavailable(Exception):
    """The shared store (Consul) did not take a token write: answered 503, nothing changed."""


@dataclass(frozen=True, slots=True)
class Grant:
    """What the credential of one request may act as: ``services`` None means any service (the shared development
    token, or loopback writes with no token configured); ``namespace`` None means any namespace."""

    token_id: str | None
    services: frozenset[str] | None
    namespace: str | None
    role: str = JOIN

    def allows(self, service: str, namespace: str | None = None) -> bool:
        """May act as ``service``; with ``namespace`` (a certificate's), in that namespace too (the registry has
        no namespaces: a registration is checked by service name only)."""
        if self.services is not None and service not in self.services:
            return False
        return namespace is None or self.namespace is None or self.namespace == namespace

    def describe(self) -> str:
        scope = ", ".join(sorted(self.services)) if self.services is not None else "any service"
        kind = "admin token" if self.role == ADMIN else "token"
        return f"{kind} {self.token_id} (scoped to {scope} in namespace {self.namespace or 'any'})"


#: The shared bootstrap token's grant: development mode, any identity.
ANY_SERVICE = Grant(None, None, None)


@dataclass(frozen=True, slots=True)
class TokenRecord:
    id: str
    digest: str
    services: tuple[str, ...]
    namespace: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    description: str
    role: str = JOIN

    def state(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"

    def public(self, now: float) -> dict[str, Any]:
        """Everything but the hash: what ``GET /v1/tokens`` lists."""
        return {
            "id": self.id,
            "services": list(self.services),
            "namespace": self.namespace,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
            "description": self.description,
            "role": self.role,
            "state": self.state(now),
        }

    def grant(self) -> Grant:
        return Grant(self.id, frozenset(self.services), self.namespace, self.role)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _name(value: Any, field: str) -> str:
    """A service or namespace name (DNS-label rules), or TokenError naming ``field``."""
    if not isinstance(value, str):
        raise TokenError(f"{field}: expected names (strings)")
    try:
        return validate_service_name(value)
    except ConfigurationError as exc:
        raise TokenError(f"{field}: {exc}") from None


@dataclass(frozen=True, slots=True)
class TokenRequest:
    services: list[str]
    namespace: str
    ttl: float | None
    description: str
    role: str


def parse_token_request(body: Any) -> TokenRequest:
    """``{"services": [...], "namespace": "default", "ttl_seconds": N, "description": "...", "role": "join"}``
    validated."""
    if not isinstance(body, dict):
        raise TokenError("expected a JSON object with services")
    unknown = set(body) - {"services", "namespace", "ttl_seconds", "description", "role"}
    if unknown:
        raise TokenError(f"unknown field(s): {', '.join(sorted(unknown))}")
    services = body.get("services")
    if not isinstance(services, list) or not services or len(services) > MAX_SERVICES:
        raise TokenError(f"services: expected a list of 1 to {MAX_SERVICES} service names")
    for name in services:
        _name(name, "services")
    namespace = _name(body.get("namespace", "default"), "namespace")
    ttl = body.get("ttl_seconds")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 1 <= ttl <= MAX_TTL):
        raise TokenError("ttl_seconds: expected a number of seconds from 1 to 10 years, or null for no expiry")
    description = body.get("description", "")
    if not isinstance(description, str) or len(description) > 256:
        raise TokenError("description: expected a string of at most 256 characters")
    role = body.get("role", JOIN)
    if role not in ROLES:
        raise TokenError(f"role: expected one of {', '.join(ROLES)}, got {str(role)[:40]!r}")
    return TokenRequest(sorted(set(services)), namespace, None if ttl is None else float(ttl), description, role)


class TokenStore:
    """Join tokens in a SQLite file beside the rules (every record kept: a revoked token stays listed as such),
    with the records mirrored in memory so a check costs a dict lookup and one hash."""

    def __init__(self, path: str | Path, clock: Any = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS tokens (id TEXT PRIMARY KEY, digest TEXT NOT NULL, services TEXT NOT NULL, "
            "namespace TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL, revoked_at REAL, "
            "description TEXT NOT NULL DEFAULT '', role TEXT NOT NULL DEFAULT 'join')"
        )
        if "role" not in {row[1] for row in self._db.execute("PRAGMA table_info(tokens)")}:
            self._db.execute("ALTER TABLE tokens ADD COLUMN role TEXT NOT NULL DEFAULT 'join'")  # every old one joins
        self._records: dict[str, TokenRecord] = {}
        for row in self._db.execute(
            "SELECT id, digest, services, namespace, created_at, expires_at, revoked_at, description, role FROM tokens"
        ):
            record = TokenRecord(
                row[0], row[1], tuple(json.loads(row[2])), row[3], row[4], row[5], row[6], row[7], row[8]
            )
            self._records[record.id] = record

    def create(
        self,
        services: Iterable[str],
        namespace: str = "default",
        ttl: float | None = None,
        description: str = "",
        role: str = JOIN,
    ) -> tuple[str, TokenRecord]:
        """A new token: its wire form (shown once, never stored) and its record."""
        if len(self._records) >= MAX_TOKENS:
            raise TokenError(f"this control plane already keeps {MAX_TOKENS} tokens: revoke unused ones first")
        token_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        now = self._clock()
        record = TokenRecord(
            token_id,
            _digest(secret),
            tuple(sorted(set(services))),
            namespace,
            now,
            None if ttl is None else now + ttl,
            None,
            description,
            role,
        )
        self._insert(record)
        return f"{PREFIX}.{token_id}.{secret}", record

    def revoke(self, token_id: str) -> TokenRecord | None:
        """Revoked at once for every later request; None when no token has that id."""
        found = self._lookup(token_id)
        with self._lock:
            record = self._records.get(token_id) or found
            if record is None:
                return None
            if record.revoked_at is None:
                record = dataclasses.replace(record, revoked_at=self._clock())
                self._store_revoked(record)
                self._records[token_id] = record
            return record

    def _lookup(self, token_id: str) -> TokenRecord | None:
        return self._records.get(token_id)

    def _insert(self, record: TokenRecord) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO tokens (id, digest, services, namespace, created_at, expires_at, revoked_at, "
                "description, role) VALUES (?, ?, ?, ?, ?, ?, NULL, ?, ?)",
                (
                    record.id,
                    record.digest,
                    json.dumps(list(record.services)),
                    record.namespace,
                    record.created_at,
                    record.expires_at,
                    record.description,
                    record.role,
                ),
            )
            self._records[record.id] = record

    def _store_revoked(self, record: TokenRecord) -> None:
        """Called with the lock held."""
        self._db.execute("UPDATE tokens SET revoked_at = ? WHERE id = ?", (record.revoked_at, record.id))

    def records(self) -> list[TokenRecord]:
        return sorted(self._records.values(), key=lambda r: r.created_at)

    def active(self) -> bool:
        """Some join token is active (then every registry write needs one; admin tokens do not count)."""
        now = self._clock()
        return any(r.role == JOIN and r.state(now) == "active" for r in self._records.values())

    def holds(self, token: str) -> bool:
        """``token`` has the join-token form (whatever its state): a refusal can then say "revoked"."""
        return token.startswith(PREFIX + ".")

    def check(self, token: str) -> Grant | str:
        """The grant of a valid, active token; else the reason it is refused (unknown, revoked, expired)."""
        _, _, rest = token.partition(".")
        token_id, _, secret = rest.partition(".")
        record = self._lookup(token_id)
        if record is None or not hmac.compare_digest(_digest(secret).encode(), record.digest.encode()):
            return "unknown join token"
        state = record.state(self._clock())
        if state != "active":
            return f"join token {token_id} is {state}"
        return record.grant()

    def close(self) -> None:
        with self._lock:
            self._db.close()
