"""The rules document seen as resources a team can own: ``services/<name>`` (one service's block) and ``defaults``.

Every stored revision carries, for each resource, the version that last changed it (Consul's ``ModifyIndex``
idea): a change to ``ledger`` leaves ``payments``' version alone, so a compare-and-set on ``payments`` conflicts
only with changes to ``payments``. A resource removed keeps the version that removed it, so a write expecting the
old version is refused and its history ends with the removal. Plain functions over documents: no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol

from ..errors import ConfigurationError
from ..settings import validate_service_name

DEFAULTS = "defaults"
SERVICE_PREFIX = "services/"
#: Most resources a revision keeps versions for (removed ones included, oldest removals dropped first).
MAX_TRACKED = 20_000


class Versioned(Protocol):
    @property
    def version(self) -> int: ...

    @property
    def document(self) -> Mapping[str, Any]: ...

    @property
    def resources(self) -> Mapping[str, int]: ...


def service_resource(name: str) -> str:
    return SERVICE_PREFIX + name


def service_of(resource: str) -> str | None:
    """The service a resource belongs to (None for ``defaults``)."""
    return resource[len(SERVICE_PREFIX) :] if resource.startswith(SERVICE_PREFIX) else None


def resources_of(document: Mapping[str, Any] | None) -> dict[str, Any]:
    """Each resource a document holds, with its content."""
    document = document or {}
    found: dict[str, Any] = {}
    if document.get(DEFAULTS) is not None:
        found[DEFAULTS] = document[DEFAULTS]
    services = document.get("services")
    if isinstance(services, Mapping):
        for name, block in services.items():
            found[service_resource(str(name))] = block
    return found


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def changed(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> list[str]:
    """The resources added, removed or changed from ``old`` to ``new``."""
    before, after = resources_of(old), resources_of(new)
    return sorted(
        name
        for name in before.keys() | after.keys()
        if name not in before or name not in after or _canonical(before[name]) != _canonical(after[name])
    )


def version_map(revision: Versioned) -> Mapping[str, int]:
    """Each resource's version in ``revision``. A revision stored before resources were tracked (an upgraded
    store) counts every resource it holds as changed at its own version: history per resource starts there."""
    if revision.resources or revision.version == 0:
        return revision.resources
    return {name: revision.version for name in resources_of(revision.document)}


def next_versions(previous: Versioned, document: Mapping[str, Any], version: int) -> dict[str, int]:
    """The version map of ``document`` stored as ``version`` on top of ``previous``."""
    result = dict(version_map(previous))
    for name in changed(previous.document, document):
        result[name] = version
    if len(result) > MAX_TRACKED:
        present = resources_of(document)
        removed = sorted((v, name) for name, v in result.items() if name not in present)
        for _, name in removed[: len(result) - MAX_TRACKED]:
            del result[name]
    return result


def with_changes(document: Mapping[str, Any] | None, changes: Mapping[str, Any | None]) -> dict[str, Any]:
    """A copy of ``document`` with each resource in ``changes`` replaced (None: removed)."""
    result: dict[str, Any] = json.loads(json.dumps(dict(document or {})))
    services: dict[str, Any] = dict(result.get("services") or {})
    for name, content in changes.items():
        service = service_of(name)
        if service is None:
            if content is None:
                result.pop(DEFAULTS, None)
            else:
                result[DEFAULTS] = content
        elif content is None:
            services.pop(service, None)
        else:
            services[service] = content
    if services:
        result["services"] = dict(sorted(services.items()))
    else:
        result.pop("services", None)
    return result


def content_of(document: Mapping[str, Any] | None, resource: str) -> Any:
    """One resource's content in ``document`` (None when absent)."""
    return resources_of(document).get(resource)


def parse_resource_name(text: str) -> str:
    """``payments`` or ``services/payments`` or ``defaults`` → the resource name; ValueError otherwise."""
    if text == DEFAULTS:
        return DEFAULTS
    name = text[len(SERVICE_PREFIX) :] if text.startswith(SERVICE_PREFIX) else text
    try:
        return service_resource(validate_service_name(name))
    except ConfigurationError as exc:
        raise ValueError(f"{text[:80]!r} names no rules resource: {exc}") from None
