"""What ``meshctl rules apply`` shows before it changes anything: the diff against the rules in force, and the
changes that are easy to make by mistake (an ``authorization`` block that disappears, a name in ``allow`` that no
service is registered under, an empty document). Plain functions over documents: no I/O."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

import yaml


def diff(
    current: Mapping[str, Any] | None, proposed: Mapping[str, Any], version: int, to: str = "proposed"
) -> list[str]:
    """A unified diff of the two documents as YAML (keys in order), ``[]`` when they are the same."""

    def lines(document: Mapping[str, Any] | None) -> list[str]:
        text = yaml.safe_dump(dict(document or {}), sort_keys=True, default_flow_style=False) if document else ""
        return text.splitlines()

    return list(difflib.unified_diff(lines(current), lines(proposed), f"version {version}", to, lineterm="", n=2))


def _services(document: Mapping[str, Any] | None) -> Mapping[str, Any]:
    services = (document or {}).get("services")
    return services if isinstance(services, Mapping) else {}


def risks(
    current: Mapping[str, Any] | None, proposed: Mapping[str, Any], registered: Mapping[str, Any] | Iterable[str]
) -> list[str]:
    """The changes to confirm (``--force``), each as one sentence that says what would happen. ``registered``: the
    registry's services (with their instances, as ``GET /v1/registry/services`` lists them, to check subsets)."""
    found: list[str] = []
    before, after = _services(current), _services(proposed)
    if not after and not any(value for key, value in proposed.items() if key != "services"):
        found.append(
            "the document is empty: every service would lose its rules (routes, retries, authorization)"
            if before
            else "the document is empty"
        )
    for name, rules in before.items():
        old = rules.get("authorization") if isinstance(rules, Mapping) else None
        new_rules = after.get(name)
        new = new_rules.get("authorization") if isinstance(new_rules, Mapping) else None
        if isinstance(old, Mapping) and old.get("mode", "strict") != "off" and not new:
            allowed = ", ".join(str(a) for a in old.get("allow") or []) or "nobody"
            found.append(
                f"services.{name}.authorization disappears: callers other than {allowed} would be let in "
                "(keep the block, or set mode: off to mean it)"
            )
    known = set(registered) | set(after)
    if isinstance(registered, Mapping):
        found += _empty_targets(current, proposed, registered)
    for name, rules in after.items():
        authz = rules.get("authorization") if isinstance(rules, Mapping) else None
        if not isinstance(authz, Mapping):
            continue
        for i, who in enumerate(authz.get("allow") or []):
            if not isinstance(who, str) or who.startswith("spiffe://") or who == "*" or who in known:
                continue
            close = difflib.get_close_matches(who, sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            found.append(
                f"services.{name}.authorization.allow[{i}]: no service named {who!r} is registered, so this "
                f"lets nobody in{hint}"
            )
    return found


def _selects(subset: Mapping[str, Any], instance: Mapping[str, Any]) -> bool:
    tags = set(instance.get("tags") or [])
    meta = instance.get("meta") or {}
    wanted = subset.get("meta") or {}
    return set(subset.get("tags") or []) <= tags and all(str(meta.get(k)) == str(v) for k, v in wanted.items())


def _empty_targets(
    current: Mapping[str, Any] | None, proposed: Mapping[str, Any], registered: Mapping[str, Any]
) -> list[str]:
    """A route sending traffic to a subset no registered instance is in (``tags: [v3]`` while only v1 and v2 run):
    those requests would fail. Only for services with instances registered, and only for routes that change."""
    found: list[str] = []
    before = _services(current)
    for name, rules in _services(proposed).items():
        instances = registered.get(name)
        if not isinstance(rules, Mapping) or not instances or rules == before.get(name):
            continue
        subsets = rules.get("subsets") or {}
        for i, route in enumerate(rules.get("routes") or []):
            for j, target in enumerate(route.get("to") or [] if isinstance(route, Mapping) else []):
                subset_name = target.get("subset") if isinstance(target, Mapping) else None
                subset = subsets.get(subset_name) if isinstance(subsets, Mapping) else None
                if not isinstance(subset, Mapping) or target.get("weight", 100) == 0:
                    continue
                if not any(_selects(subset, inst) for inst in instances if isinstance(inst, Mapping)):
                    found.append(
                        f"services.{name}.routes[{i}].to[{j}]: no registered instance of {name} is in subset "
                        f"{subset_name!r} ({len(instances)} registered), so its share of requests would fail"
                    )
    return found
