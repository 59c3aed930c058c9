"""Rules as resources teams own (issue 31), in-process against real SQLite files: each service's block versioned on
its own, writes that conflict only with changes to what they change, history per service, a store from before
per-service rules migrated, and the ``defaults`` block every unnamed service inherits."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from meshlib.control.resources import changed, next_versions, version_map, with_changes
from meshlib.control.rules_writes import ResourceConflict, resource_history, write_resources
from meshlib.control.store import SQLiteRulesStore
from meshlib.control.tokens import ADMIN, JOIN, TokenStore
from meshlib.rules.model import RulesValidationError, validate_rules
from meshlib.rules.review import risks

LIMIT = 1 << 20
PAYMENTS, LEDGER = "services/payments", "services/ledger"


def write(store: SQLiteRulesStore, changes: dict, expect: dict | None = None, who: str = "team"):
    return write_resources(store, changes, expect or {}, who, "", LIMIT)


def test_a_change_to_one_service_leaves_the_others_version_alone(tmp_path: Path) -> None:
    store = SQLiteRulesStore(tmp_path / "rules.db")
    first = write(store, {PAYMENTS: {"timeout": "2s"}}, {PAYMENTS: 0})
    assert first.changed == [PAYMENTS] and first.revision.version == 1
    write(store, {LEDGER: {"timeout": "1s"}}, {LEDGER: 0})
    current = store.current()
    assert current.document == {"services": {"ledger": {"timeout": "1s"}, "payments": {"timeout": "2s"}}}
    assert version_map(current) == {PAYMENTS: 1, LEDGER: 2}
    # payments' team applies over the version they saw (1): ledger's change in between is no conflict
    third = write(store, {PAYMENTS: {"timeout": "3s"}}, {PAYMENTS: 1})
    assert third.revision.version == 3 and version_map(third.revision) == {PAYMENTS: 3, LEDGER: 2}
    with pytest.raises(ResourceConflict) as stale:
        write(store, {PAYMENTS: {"timeout": "4s"}}, {PAYMENTS: 1})
    assert stale.value.current == 3 and "someone changed it" in str(stale.value)
    assert store.current().version == 3, "a refused write stored nothing"
    with pytest.raises(ResourceConflict):
        write(store, {LEDGER: {"timeout": "9s"}}, {LEDGER: 0})  # 0: "must not exist yet"


def test_a_write_that_changes_nothing_makes_no_version(tmp_path: Path) -> None:
    store = SQLiteRulesStore(tmp_path / "rules.db")
    write(store, {PAYMENTS: {"timeout": "2s"}})
    again = write(store, {PAYMENTS: {"timeout": "2s"}})
    assert again.changed == [] and store.current().version == 1


def test_an_invalid_block_is_refused_with_its_path_and_nothing_is_stored(tmp_path: Path) -> None:
    store = SQLiteRulesStore(tmp_path / "rules.db")
    write(store, {LEDGER: {"timeout": "1s"}})
    with pytest.raises(RulesValidationError) as bad:
        write(store, {PAYMENTS: {"timeout": "soon", "colour": "blue"}})
    assert {e.path for e in bad.value.errors} == {"services.payments.timeout", "services.payments.colour"}
    assert store.current().version == 1


def test_removal_is_a_version_of_its_own_and_ends_the_history(tmp_path: Path) -> None:
    store = SQLiteRulesStore(tmp_path / "rules.db")
    write(store, {PAYMENTS: {"timeout": "2s"}}, who="ann")
    write(store, {LEDGER: {"timeout": "1s"}}, who="bob")
    write(store, {PAYMENTS: {"timeout": "3s"}}, who="ann")
    write(store, {PAYMENTS: None}, who="cy")
    assert store.current().document == {"services": {"ledger": {"timeout": "1s"}}}
    history = resource_history(store, PAYMENTS, 10)
    assert [(c.revision.version, c.action, c.revision.author) for c in history] == [
        (4, "removed", "cy"),
        (3, "changed", "ann"),
        (1, "created", "ann"),
    ]
    assert [c.revision.version for c in resource_history(store, LEDGER, 10)] == [2]
    assert [c.revision.version for c in resource_history(store, PAYMENTS, 2)] == [4, 3]
    with pytest.raises(ResourceConflict):  # the removal has a version: a writer who saw 3 is told
        write(store, {PAYMENTS: {"timeout": "5s"}}, {PAYMENTS: 3})


def test_several_resources_change_in_one_version_or_not_at_all(tmp_path: Path) -> None:
    store = SQLiteRulesStore(tmp_path / "rules.db")
    write(store, {LEDGER: {"timeout": "1s"}})
    with pytest.raises(RulesValidationError):
        write(store, {PAYMENTS: {"timeout": "2s"}, "defaults": {"routes": []}})
    assert store.current().version == 1 and "payments" not in store.current().document["services"]
    both = write(store, {PAYMENTS: {"timeout": "2s"}, "defaults": {"timeout": "5s"}})
    assert both.changed == ["defaults", PAYMENTS] and both.revision.version == 2


def test_a_store_from_before_per_service_rules_is_migrated(tmp_path: Path) -> None:
    """An upgraded control plane opens an old rules.db (no resources column) and tokens.db (no role column):
    every version and token is kept, old tokens stay join tokens, per-service history starts at the upgrade."""
    path = tmp_path / "rules.db"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE rules (version INTEGER PRIMARY KEY, document TEXT NOT NULL, created_at REAL NOT NULL, "
        "author TEXT NOT NULL DEFAULT '', comment TEXT NOT NULL DEFAULT '')"
    )
    for version, doc in (
        (1, {"services": {"payments": {"timeout": "2s"}}}),
        (2, {"services": {"payments": {"timeout": "2s"}, "ledger": {"timeout": "1s"}}}),
    ):
        old.execute("INSERT INTO rules VALUES (?, ?, ?, 'old', '')", (version, json.dumps(doc), 1.0))
    old.commit()
    old.close()
    tokens_path = tmp_path / "tokens.db"
    old = sqlite3.connect(tokens_path)
    old.execute(
        "CREATE TABLE tokens (id TEXT PRIMARY KEY, digest TEXT NOT NULL, services TEXT NOT NULL, "
        "namespace TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL, revoked_at REAL, "
        "description TEXT NOT NULL DEFAULT '')"
    )
    old.execute("INSERT INTO tokens VALUES ('abc', 'd', '[\"payments\"]', 'default', 1.0, NULL, NULL, '')")
    old.commit()
    old.close()

    store = SQLiteRulesStore(path)
    assert store.current().version == 2 and store.get(1).document["services"]["payments"] == {"timeout": "2s"}
    assert version_map(store.current()) == {PAYMENTS: 2, LEDGER: 2}
    write(store, {LEDGER: {"timeout": "3s"}}, {LEDGER: 2})
    assert version_map(store.current()) == {PAYMENTS: 2, LEDGER: 3}
    assert [c.action for c in resource_history(store, LEDGER, 10)] == ["changed", "migrated"]
    assert TokenStore(tokens_path).records()[0].role == JOIN


def test_scoped_admin_tokens_keep_their_role(tmp_path: Path) -> None:
    tokens = TokenStore(tmp_path / "tokens.db")
    secret, _ = tokens.create(["payments"], role=ADMIN)
    grant = tokens.check(secret)
    assert not isinstance(grant, str) and grant.role == ADMIN and grant.allows("payments")
    assert not grant.allows("ledger")
    assert TokenStore(tmp_path / "tokens.db").records()[0].role == ADMIN, "the role survives a restart"


def test_defaults_apply_to_every_service_that_does_not_set_the_field() -> None:
    rules = validate_rules(
        {
            "defaults": {"timeout": "3s", "retries": {"attempts": 2}},
            "services": {"payments": {"timeout": "1s"}, "ledger": None},
        }
    )
    payments = rules.for_service("payments")
    assert payments is not None and payments.policy.timeout == 1.0 and payments.policy.retries.attempts == 2
    unnamed = rules.for_service("anything")
    assert unnamed is not None and unnamed.policy.timeout == 3.0
    ledger = rules.for_service("ledger")
    assert ledger is not None and ledger.policy.timeout == 3.0
    assert validate_rules({"services": {"payments": {}}}).for_service("other") is None
    with pytest.raises(RulesValidationError) as bad:
        validate_rules({"defaults": {"authorization": {"allow": ["x"]}, "timeout": "x"}})
    assert {e.path for e in bad.value.errors} == {"defaults.authorization", "defaults.timeout"}


def test_resource_functions_round_trip() -> None:
    doc = {"services": {"a": {"timeout": "1s"}}}
    assert with_changes(doc, {"services/b": {}, "defaults": {"timeout": "2s"}}) == {
        "defaults": {"timeout": "2s"},
        "services": {"a": {"timeout": "1s"}, "b": {}},
    }
    assert with_changes(doc, {"services/a": None}) == {}
    assert changed(doc, {"services": {"a": {"timeout": "1s"}}}) == []
    assert changed(doc, {}) == ["services/a"]

    class Rev:
        version, document, resources = 0, {}, {}

    assert next_versions(Rev(), doc, 1) == {"services/a": 1}


def test_a_route_to_a_subset_no_registered_instance_is_in_is_a_risk() -> None:
    registered = {"payments": [{"tags": ["v1"], "meta": {}}, {"tags": ["v2"], "meta": {}}]}
    canary = {
        "services": {
            "payments": {
                "subsets": {"v2": {"tags": ["v2"]}, "v3": {"tags": ["v3"]}},
                "routes": [{"to": [{"subset": "v2", "weight": 90}, {"subset": "v3", "weight": 10}]}],
            }
        }
    }
    found = risks({}, canary, registered)
    assert len(found) == 1 and "routes[0].to[1]" in found[0] and "'v3'" in found[0]
    assert risks({}, canary, {"payments": [{"tags": ["v3"]}, {"tags": ["v2"]}]}) == []
