"""The rules document (design §5): strict validation that reports *every* problem by path, and compilation into
immutable per-service objects the call path reads.

Hand-written rather than pydantic: the schema is small, the cross-field checks (weights, subset references) are
most of the work, and every instance loads this module, so it stays light to import.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError
from ..policy.config import (
    LOAD_BALANCERS,
    RETRY_ON_NAMES,
    BreakerPolicy,
    HedgingPolicy,
    RetryBudgetPolicy,
    RetryPolicy,
    ServicePolicy,
)
from ..policy.rules import (
    Authorization,
    Destination,
    Faults,
    HeaderMatch,
    Mirror,
    Route,
    ServiceRules,
    Subset,
)
from .checks import Checker, RuleError, RulesValidationError

__all__ = ["EMPTY_RULES", "RuleError", "Rules", "RulesValidationError", "parse_rules", "validate_rules"]
from .document import check_json, parse_document
from .regex import RegexError, compile_regex

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_HEADER = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


# -- compiled form (the per-service types live in policy/rules.py: the call path's own) --------------


@dataclass(frozen=True, slots=True)
class Rules:
    """One validated rules document, versioned as a whole."""

    version: int
    document: Mapping[str, Any]
    services: Mapping[str, ServiceRules]
    #: Accepted, but worth a look (a subset no route uses: the normal state after a finished canary).
    warnings: tuple[RuleError, ...] = ()
    #: The ``defaults`` block compiled on its own: the rules of every service the document does not name.
    defaults: ServiceRules | None = None

    def for_service(self, name: str) -> ServiceRules | None:
        return self.services.get(name, self.defaults)


EMPTY_RULES = Rules(0, {}, {})


# -- parsing and validation -------------------------------------------------------------------------


_SERVICE_FIELDS = {
    "timeout",
    "retries",
    "circuit_breaker",
    "hedging",
    "load_balancer",
    "subsets",
    "routes",
    "faults",
    "authorization",
}
#: What ``defaults`` may set: the policy every service shares unless its own block sets the same field. Subsets,
#: routes, faults and authorization are each service's own (a mesh-wide allow list would be a trap).
DEFAULT_FIELDS = {"timeout", "retries", "circuit_breaker", "hedging", "load_balancer"}


def _check_service(c: Checker, name: str, raw: Any, path: str | None = None) -> ServiceRules:
    p = path or f"services.{name}"
    if path is None and not _NAME.match(name):
        c.err(p, "service names are lowercase letters, digits and '-', 1-63 characters")
    svc = c.mapping(raw, p, _SERVICE_FIELDS if path is None else DEFAULT_FIELDS)
    timeout = c.duration(svc.get("timeout"), f"{p}.timeout")

    r = c.mapping(
        svc.get("retries"), f"{p}.retries", {"attempts", "per_try_timeout", "on", "budget", "retry_non_idempotent"}
    )
    attempts = c.integer(r.get("attempts"), f"{p}.retries.attempts", 1, 10)
    per_try = c.duration(r.get("per_try_timeout"), f"{p}.retries.per_try_timeout")
    on_list = None
    if "on" in r:
        on_raw = r["on"]
        if not isinstance(on_raw, list):
            c.err(f"{p}.retries.on", "expected a list such as [connect-failure, reset, 503]")
        else:
            on_list = []
            for i, item in enumerate(on_raw):
                text = str(item)
                if text in RETRY_ON_NAMES or (text.isdigit() and 500 <= int(text) <= 599 and len(text) == 3):
                    on_list.append(text)
                else:
                    c.err(
                        f"{p}.retries.on[{i}]",
                        f"{item!r} is not a retry condition ({', '.join(sorted(RETRY_ON_NAMES))} or a 5xx status)",
                    )
    b = c.mapping(r.get("budget"), f"{p}.retries.budget", {"ratio", "min_per_second"})
    ratio = c.number(b.get("ratio"), f"{p}.retries.budget.ratio", 0.0, 1.0)
    min_ps = c.number(b.get("min_per_second"), f"{p}.retries.budget.min_per_second", 0.0, 100_000.0)
    non_idem = c.boolean(r.get("retry_non_idempotent"), f"{p}.retries.retry_non_idempotent")

    cb = c.mapping(
        svc.get("circuit_breaker"),
        f"{p}.circuit_breaker",
        {"consecutive_failures", "open_for", "max_ejection_percent", "panic_threshold_percent"},
    )
    failures = c.integer(cb.get("consecutive_failures"), f"{p}.circuit_breaker.consecutive_failures", 1, 1000)
    open_for = c.duration(cb.get("open_for"), f"{p}.circuit_breaker.open_for")
    max_ejection = c.number(cb.get("max_ejection_percent"), f"{p}.circuit_breaker.max_ejection_percent", 0.0, 100.0)
    panic = c.number(cb.get("panic_threshold_percent"), f"{p}.circuit_breaker.panic_threshold_percent", 0.0, 100.0)

    hedging = _hedging(c, svc.get("hedging"), f"{p}.hedging")

    lb = svc.get("load_balancer")
    if lb is not None and lb not in LOAD_BALANCERS:
        c.err(f"{p}.load_balancer", f"{lb!r} is not one of {', '.join(LOAD_BALANCERS)}")
        lb = None

    subsets: dict[str, Subset] = {}
    for sname, sraw in c.mapping(svc.get("subsets"), f"{p}.subsets").items():
        sp = f"{p}.subsets.{sname}"
        s = c.mapping(sraw, sp, {"tags", "meta"})
        tags = c.strings(s.get("tags"), f"{sp}.tags")
        meta = c.mapping(s.get("meta"), f"{sp}.meta")
        for mkey, mval in meta.items():
            if isinstance(mval, bool) or not isinstance(mval, str | int):
                c.err(f"{sp}.meta.{mkey}", f"expected a string (instance meta values are strings), got {mval!r:.40}")
        if not tags and not meta:
            c.err(sp, "a subset needs tags or meta to select endpoints by")
        subsets[str(sname)] = Subset(frozenset(tags), {str(k): str(v) for k, v in meta.items()})

    routes: list[Route] = []
    used: set[str] = set()
    named: dict[str, int] = {}
    raw_routes = svc.get("routes")
    if raw_routes is not None and not isinstance(raw_routes, list):
        c.err(f"{p}.routes", "expected a list of routes")
        raw_routes = []
    for i, rraw in enumerate(raw_routes or []):
        rp = f"{p}.routes[{i}]"
        rt = c.mapping(rraw, rp, {"name", "match", "to", "sticky", "retry_non_idempotent", "mirror"})
        route_name = rt.get("name")
        if route_name is not None:
            if not isinstance(route_name, str) or not _NAME.match(route_name) or route_name == "default":
                c.err(
                    f"{rp}.name",
                    f"expected lowercase letters, digits and '-' (1-63, not 'default'), got {route_name!r:.40}",
                )
                route_name = None
            elif route_name in named:
                c.err(f"{rp}.name", f"{route_name!r} already names routes[{named[route_name]}]: route names are unique")
                route_name = None
            else:
                named[route_name] = i
        m = c.mapping(rt.get("match"), f"{rp}.match", {"headers", "path_prefix", "methods"})
        headers: list[HeaderMatch] = []
        for hname, hval in c.mapping(m.get("headers"), f"{rp}.match.headers").items():
            hp = f"{rp}.match.headers.{hname}"
            if not _HEADER.match(str(hname)):
                c.err(hp, "not a valid header name")
                continue
            if isinstance(hval, str | int) and not isinstance(hval, bool):
                headers.append(HeaderMatch(str(hname).lower(), exact=str(hval)))
                continue
            hm = c.mapping(hval, hp, {"exact", "prefix", "regex"})
            if len(hm) != 1:
                c.err(hp, "give a value, or exactly one of exact, prefix, regex")
                continue
            kind, pattern = next(iter(hm.items()))
            if kind == "regex":
                try:
                    headers.append(HeaderMatch(str(hname).lower(), regex=compile_regex(str(pattern))))
                except RegexError as exc:
                    c.err(f"{hp}.regex", str(exc))
            elif kind == "exact":
                headers.append(HeaderMatch(str(hname).lower(), exact=str(pattern)))
            elif kind == "prefix":
                headers.append(HeaderMatch(str(hname).lower(), prefix=str(pattern)))
        path_prefix = m.get("path_prefix")
        if path_prefix is not None and (not isinstance(path_prefix, str) or not path_prefix.startswith("/")):
            c.err(f"{rp}.match.path_prefix", "expected a path starting with /")
            path_prefix = None
        methods = c.strings(m.get("methods"), f"{rp}.match.methods")

        to_raw = rt.get("to")
        dests: list[Destination] = []
        if not isinstance(to_raw, list) or not to_raw:
            c.err(f"{rp}.to", "required: a non-empty list of destinations")
            to_raw = []
        weights_given = [isinstance(d, dict) and "weight" in d for d in to_raw]
        if len(to_raw) > 1 and not all(weights_given):
            c.err(f"{rp}.to", "with several destinations every one needs a weight (weights add up to 100)")
        total = 0
        for j, draw in enumerate(to_raw):
            dp = f"{rp}.to[{j}]"
            d = c.mapping(draw, dp, {"subset", "weight"})
            subset = d.get("subset")
            if subset is not None:
                if subset not in subsets:
                    c.err(
                        f"{dp}.subset", f"unknown subset {subset!r} (defined: {', '.join(sorted(subsets)) or 'none'})"
                    )
                used.add(str(subset))
            weight = c.integer(d.get("weight"), f"{dp}.weight", 0, 100) if "weight" in d else 100
            total += weight or 0
            dests.append(Destination(None if subset is None else str(subset), weight or 0))
        if to_raw and all(weights_given) and total != 100:
            c.err(f"{rp}.to", f"weights add up to {total}, not 100")
        sticky = c.mapping(rt.get("sticky"), f"{rp}.sticky", {"header"})
        sticky_header = sticky.get("header")
        if sticky_header is not None and (not isinstance(sticky_header, str) or not _HEADER.match(sticky_header)):
            c.err(f"{rp}.sticky.header", "expected a header name")
            sticky_header = None
        mirror = None
        if rt.get("mirror") is not None:
            mr = c.mapping(rt.get("mirror"), f"{rp}.mirror", {"subset", "percent"})
            msubset = mr.get("subset")
            if not isinstance(msubset, str) or msubset not in subsets:
                defined = ", ".join(sorted(subsets)) or "none"
                c.err(f"{rp}.mirror.subset", f"required: a defined subset (defined: {defined}), got {msubset!r:.40}")
            else:
                used.add(msubset)
                percent = c.number(mr.get("percent", 100), f"{rp}.mirror.percent", 0.0, 100.0)
                if percent is not None and percent > 0:
                    mirror = Mirror(msubset, percent)
        routes.append(
            Route(
                index=i,
                headers=tuple(headers),
                path_prefix=path_prefix,
                methods=frozenset(x.upper() for x in methods) or None,
                to=tuple(dests),
                sticky_header=sticky_header.lower() if sticky_header else None,
                retry_non_idempotent=c.boolean(rt.get("retry_non_idempotent"), f"{rp}.retry_non_idempotent"),
                mirror=mirror,
                given_name=route_name,
            )
        )
    for sname in subsets:
        if sname not in used:
            c.warn(f"{p}.subsets.{sname}", "no route sends traffic to this subset (kept, e.g. for a rollback)")

    f = c.mapping(svc.get("faults"), f"{p}.faults", {"delay", "abort"})
    faults = None
    if f:
        fd = c.mapping(f.get("delay"), f"{p}.faults.delay", {"percent", "duration"})
        fa = c.mapping(f.get("abort"), f"{p}.faults.abort", {"percent", "status"})
        if fd and "duration" not in fd:
            c.err(f"{p}.faults.delay.duration", "required")
        faults = Faults(
            delay_percent=c.number(fd.get("percent", 100 if fd else 0), f"{p}.faults.delay.percent", 0, 100) or 0.0,
            delay=c.duration(fd.get("duration"), f"{p}.faults.delay.duration") or 0.0,
            abort_percent=c.number(fa.get("percent", 100 if fa else 0), f"{p}.faults.abort.percent", 0, 100) or 0.0,
            abort_status=c.integer(fa.get("status", 503), f"{p}.faults.abort.status", 200, 599) or 503,
        )

    a = c.mapping(svc.get("authorization"), f"{p}.authorization", {"mode", "allow"})
    authz = None
    if a:
        mode = a.get("mode", "strict")
        if mode not in ("strict", "permissive", "off"):
            c.err(f"{p}.authorization.mode", f"{mode!r} is not one of strict, permissive, off")
            mode = "strict"
        allow = c.strings(a.get("allow"), f"{p}.authorization.allow")
        for i, who in enumerate(allow):
            if not (who.startswith("spiffe://") or _NAME.match(who) or who == "*"):
                c.err(f"{p}.authorization.allow[{i}]", f"{who!r} is neither a service name nor a spiffe:// ID")
        authz = Authorization(mode, frozenset(allow))

    defaults = RetryPolicy()
    budget_defaults = RetryBudgetPolicy()
    breaker_defaults = BreakerPolicy()
    policy = ServicePolicy(
        timeout=timeout,
        retries=RetryPolicy(
            attempts=attempts if attempts is not None else defaults.attempts,
            per_try_timeout=per_try,
            on=frozenset(on_list) if on_list is not None else defaults.on,
            budget=RetryBudgetPolicy(
                ratio=ratio if ratio is not None else budget_defaults.ratio,
                min_per_second=min_ps if min_ps is not None else budget_defaults.min_per_second,
            ),
            retry_non_idempotent=bool(non_idem),
        ),
        circuit_breaker=BreakerPolicy(
            consecutive_failures=failures or breaker_defaults.consecutive_failures,
            open_for=open_for or breaker_defaults.open_for,
            max_ejection_percent=max_ejection if max_ejection is not None else breaker_defaults.max_ejection_percent,
            panic_threshold_percent=panic if panic is not None else breaker_defaults.panic_threshold_percent,
        ),
        load_balancer=lb or "p2c_ewma",
        hedging=hedging,
    )
    return ServiceRules(policy, subsets, tuple(routes), faults, authz)


_PERCENTILE = re.compile(r"^p(50|75|90|95|99|99\.9)$")


def _hedging(c: Checker, raw: Any, path: str) -> HedgingPolicy | None:
    """``hedging: {delay: p95 | 50ms, max_attempts: 2, budget_percent: 10}``; absent: no hedging."""
    if raw is None:
        return None
    h = c.mapping(raw, path, {"delay", "max_attempts", "budget_percent"})
    defaults = HedgingPolicy()
    delay_raw = h.get("delay", "p95")
    fixed: float | None = None
    percentile: float | None = None
    if isinstance(delay_raw, str) and _PERCENTILE.match(delay_raw.strip()):
        percentile = float(delay_raw.strip()[1:])
    else:
        fixed = c.duration(delay_raw, f"{path}.delay")
        if fixed is None and isinstance(delay_raw, str) and delay_raw.startswith("p"):
            hint = f"{delay_raw!r}: use p50, p75, p90, p95, p99 or p99.9, or a duration"
            c.errors[-1] = RuleError(f"{path}.delay", hint)
    attempts = c.integer(h.get("max_attempts"), f"{path}.max_attempts", 2, 5)
    budget = c.number(h.get("budget_percent"), f"{path}.budget_percent", 0.0, 100.0)
    return HedgingPolicy(
        delay=fixed,
        percentile=percentile,
        max_attempts=attempts if attempts is not None else defaults.max_attempts,
        budget_percent=budget if budget is not None else defaults.budget_percent,
    )


def validate_rules(document: Any, version: int = 0) -> Rules:
    """Validate and compile a rules document; raises RulesValidationError listing every problem."""
    c = Checker()
    try:  # the document may come from anywhere (a cache file, Python code): only finite JSON data is a document
        check_json(document, "$")
    except ConfigurationError as exc:
        raise RulesValidationError([RuleError(*str(exc).split(": ", 1))]) from None
    doc = c.mapping(document, "$", {"services", "defaults"}) if document is not None else {}
    defaults_raw = doc.get("defaults")
    defaults = _check_service(c, "defaults", defaults_raw, "defaults") if defaults_raw is not None else None
    shared = dict(defaults_raw) if isinstance(defaults_raw, Mapping) and not c.errors else {}
    services: dict[str, ServiceRules] = {}
    for name, raw in c.mapping(doc.get("services"), "services").items():
        # a field the service sets replaces the default's whole (retries: {attempts: 1} keeps no default retry
        # condition): one rule to remember, and the block a team reads is the block that applies
        merged = {**shared, **(raw or {})} if shared and (raw is None or isinstance(raw, Mapping)) else raw
        services[str(name)] = _check_service(c, str(name), merged)
    if c.errors:
        raise RulesValidationError(c.errors)
    return Rules(version, json.loads(json.dumps(doc)), services, tuple(c.warnings), defaults)


def parse_rules(text: str | bytes, source: str = "rules") -> Any:
    """Parse YAML or JSON text into a document, bounded (see ``rules.document``); errors name the source and line."""
    return parse_document(text, source)
