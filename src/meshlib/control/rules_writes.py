"""Changing some resources of the rules (one service's block, the defaults) without touching the others, and reading
one resource's history. Blocking (the store is SQLite or Consul): the routes run these in a thread.

A write reads the current document, checks each expected resource version, replaces only its resources, validates
the whole result (a block is checked with the defaults it inherits) and stores it with a compare-and-set on the
document's version. Losing that race to a change of *another* resource is not a conflict: the write is redone on
top of it. Only a change to an expected resource is.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..rules.model import Rules, validate_rules
from .resources import changed, content_of, version_map, with_changes
from .store import CasConflict, Revision, RulesStore

#: Tries on top of concurrent writes to other resources before giving up (a write storm, not a conflict).
MAX_TRIES = 20
#: Most revisions read to list one resource's history.
MAX_HISTORY_READS = 1000


class ResourceConflict(Exception):
    """The resource changed since the version the writer saw."""

    def __init__(self, resource: str, expected: int, current: int) -> None:
        super().__init__(
            f"{resource} is at version {current}, not {expected}: someone changed it meanwhile; look with "
            f"meshctl rules history --service {resource.removeprefix('services/')}, then apply again"
        )
        self.resource = resource
        self.expected = expected
        self.current = current


class TooBig(Exception):
    """The document would grow past the size limit."""


class Busy(Exception):
    """Other writers kept winning the compare-and-set."""


@dataclass(frozen=True, slots=True)
class Written:
    revision: Revision
    rules: Rules
    #: The resources this write changed (empty: the document already said so, and no version was made).
    changed: list[str]


def write_resources(
    store: RulesStore,
    changes: Mapping[str, Any | None],
    expect: Mapping[str, int],
    author: str,
    comment: str,
    max_bytes: int,
) -> Written:
    """Replace (or, with None, remove) the resources in ``changes``; each resource in ``expect`` must be at that
    version (0: must not exist yet). Raises ResourceConflict, RulesValidationError, TooBig or Busy."""
    for _ in range(MAX_TRIES):
        current = store.current()
        versions = version_map(current)
        for resource, expected in expect.items():
            if versions.get(resource, 0) != expected:
                raise ResourceConflict(resource, expected, versions.get(resource, 0))
        document = with_changes(current.document, changes)
        if len(json.dumps(document)) > max_bytes:
            raise TooBig(f"the rules would be larger than {max_bytes} bytes")
        rules = validate_rules(document)
        made = changed(current.document, document)
        if not made:
            return Written(current, validate_rules(document, current.version), [])
        try:
            revision = store.put(document, current.version, author, comment)
        except CasConflict:
            continue  # someone changed the document; the expectations are checked again on top of it
        return Written(revision, rules, made)
    raise Busy(f"gave up after {MAX_TRIES} tries: the rules are being changed by other writers all the time")


@dataclass(frozen=True, slots=True)
class Change:
    revision: Revision
    #: "created", "changed", "removed", or "migrated" (stored before resources were tracked: earlier changes
    #: are in the whole document's history).
    action: str


def resource_history(store: RulesStore, resource: str, limit: int) -> list[Change]:
    """The revisions that changed ``resource``, newest first."""
    found: list[Change] = []
    version = version_map(store.current()).get(resource)
    reads = 0
    while version and len(found) < limit and reads < MAX_HISTORY_READS:
        at = store.get(version)
        reads += 1
        if not at.resources:
            found.append(Change(at, "migrated"))
            break
        before = store.get(version - 1)
        reads += 1
        if content_of(at.document, resource) is None:
            action = "removed"
        else:
            action = "created" if content_of(before.document, resource) is None else "changed"
        found.append(Change(at, action))
        version = version_map(before).get(resource)
    return found
