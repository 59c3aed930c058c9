"""The live policy state of one destination service: its endpoints with their load and breaker, its balancer,
retry strategy and budget. Updated by discovery pushes and rule changes; read by every call."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..endpoints import Endpoint, EndpointSet
from ..errors import CircuitOpenError, NoEndpointsError
from .balancer import LoadStats, make_balancer, weight_class
from .breaker import CLOSED, EndpointBreaker, TransitionListener
from .config import DEFAULT_POLICY, ServicePolicy
from .hedging import Hedger
from .retry import RetryBudget, RetryStrategy
from .routing import DEFAULT_CHOICE, HeaderLookup, RouteChoice, choose
from .rules import Faults, ServiceRules

Clock = Callable[[], float]


class EndpointHandle:
    """One endpoint as the call path sees it. Survives discovery updates while the instance stays listed, so its
    latency estimate and breaker state are kept."""

    __slots__ = ("breaker", "endpoint", "key", "label", "load", "weight")

    def __init__(self, endpoint: Endpoint, now: float, breaker: EndpointBreaker) -> None:
        self.endpoint = endpoint
        self.key = endpoint.key
        self.label = endpoint.authority
        self.load = LoadStats(now)
        self.breaker = breaker
        self.weight = endpoint.weight


@dataclass(slots=True)
class CallPlan:
    """Where one call may go, decided once before its first attempt: the route and subset it took, the endpoints
    of that subset, and the route's fault injection and retry overrides."""

    choice: RouteChoice
    pool: tuple[EndpointHandle, ...] | None  # None: every endpoint of the service
    faults: Faults | None
    retry_non_idempotent: bool | None
    #: A copy of this call goes to this subset (the route's ``mirror`` drew it).
    mirror: str | None = None


DEFAULT_PLAN = CallPlan(DEFAULT_CHOICE, None, None, None)


@dataclass(slots=True)
class Pick:
    handle: EndpointHandle
    #: This attempt is the breaker's single half-open trial.
    trial: bool
    #: What the balancer weighed: this endpoint's cost, and the endpoint it was weighed against with its cost.
    cost: float = 0.0
    rival: EndpointHandle | None = None
    rival_cost: float = 0.0


class ServiceState:
    def __init__(
        self,
        name: str,
        clock: Clock,
        policy: ServicePolicy = DEFAULT_POLICY,
        on_breaker_transition: Callable[[str, str, str], None] | None = None,
        zone: str = "",
    ) -> None:
        self.name = name
        #: The caller's zone: endpoints in it are preferred while one of them can take the call.
        self.zone = zone
        #: Some endpoint's weight is not 1: each pick first draws a weight class (see ``weight_class``).
        self.weighted = False
        self.clock = clock
        self.policy = policy
        self.balancer = make_balancer(policy.load_balancer)
        self.retry = RetryStrategy(policy.retries)
        self.budget = RetryBudget(policy.retries.budget)
        self.hedger = Hedger(policy.hedging) if policy.hedging is not None else None
        self.handles: tuple[EndpointHandle, ...] = ()
        self.snapshot: EndpointSet | None = None
        self._by_key: dict[tuple[str, int, str], EndpointHandle] = {}
        self._not_closed = 0
        self._external_listener = on_breaker_transition
        self.rules: ServiceRules | None = None
        self._subset_pools: dict[str, tuple[EndpointHandle, ...]] = {}
        #: The caller's zone's share of the whole service (key None) and of each subset pool (key: its name).
        self._zone_pools: dict[str | None, tuple[EndpointHandle, ...]] = {}
        #: Why listed endpoints were left out (e.g. plaintext ones under strict mTLS), for error messages.
        self.excluded = ""
        #: When a call last used this service (the mesh stops watching services nobody calls any more).
        self.last_used = clock()

    # -- updates (discovery and rules) ------------------------------------------------------------

    def _transition_listener(self, label: str) -> TransitionListener:
        def on_transition(old: str, new: str) -> None:
            if old == CLOSED and new != CLOSED:
                self._not_closed += 1
            elif new == CLOSED and old != CLOSED:
                self._not_closed -= 1
            if self._external_listener is not None:
                self._external_listener(label, old, new)

        return on_transition

    def set_endpoints(self, snapshot: EndpointSet) -> None:
        now = self.clock()
        handles = []
        by_key = {}
        for endpoint in snapshot.endpoints:
            handle = self._by_key.get(endpoint.key)
            if handle is None:
                breaker = EndpointBreaker(
                    self.policy.circuit_breaker, self.clock, (self._transition_listener(endpoint.authority),)
                )
                handle = EndpointHandle(endpoint, now, breaker)
            else:
                handle.endpoint = endpoint  # tags, meta, zone or weight may have changed
                handle.weight = endpoint.weight
            handles.append(handle)
            by_key[endpoint.key] = handle
        self._by_key = by_key
        self._not_closed = sum(1 for h in handles if h.breaker.state != CLOSED)
        self.handles = tuple(handles)
        self._subset_pools = {}
        self._zone_pools = {}
        self.weighted = any(h.weight != 1 for h in handles)
        self.snapshot = snapshot

    def set_policy(self, policy: ServicePolicy) -> None:
        if policy == self.policy:
            return
        old = self.policy
        if policy.load_balancer != old.load_balancer:
            self.balancer = make_balancer(policy.load_balancer)
        if policy.retries != old.retries:
            self.retry = RetryStrategy(policy.retries)
        if policy.retries.budget != old.retries.budget:
            self.budget = RetryBudget(policy.retries.budget)
        if policy.hedging != old.hedging:
            self.hedger = Hedger(policy.hedging) if policy.hedging is not None else None
        if policy.circuit_breaker != old.circuit_breaker:
            for handle in self.handles:
                handle.breaker.update_policy(policy.circuit_breaker)
        self.policy = policy

    def set_rules(self, rules: ServiceRules | None, default_policy: ServicePolicy = DEFAULT_POLICY) -> None:
        """Apply this service's block of a new rules document (None: the service has no rules any more)."""
        self.rules = rules
        self._subset_pools = {}
        self._zone_pools = {}
        self.set_policy(rules.policy if rules is not None else default_policy)

    def subset_pool(self, name: str) -> tuple[EndpointHandle, ...]:
        pool = self._subset_pools.get(name)
        if pool is None:
            rules = self.rules
            subset = rules.subsets.get(name) if rules is not None else None
            if subset is None:
                pool = ()
            else:
                pool = tuple(h for h in self.handles if subset.selects(h.endpoint.tags, h.endpoint.meta))
            self._subset_pools[name] = pool
        return pool

    # -- the call path ----------------------------------------------------------------------------

    def may_eject(self) -> bool:
        """Envoy's ``max_ejection_percent``: another endpoint may be ejected while fewer than that share of the
        service's endpoints are (at least one always may)."""
        allowed = max(1, int(len(self.handles) * self.policy.circuit_breaker.max_ejection_percent / 100.0))
        return self._not_closed < allowed

    def plan(self, method: str, path: str, header: HeaderLookup, rand: Callable[[], float]) -> CallPlan:
        rules = self.rules
        if rules is None:
            return DEFAULT_PLAN
        if not rules.routes:
            return CallPlan(DEFAULT_CHOICE, None, rules.faults, None) if rules.faults else DEFAULT_PLAN
        choice = choose(rules, method, path, header, rand)
        pool = None if choice.subset is None else self.subset_pool(choice.subset)
        route = choice.route
        if route is None:
            return CallPlan(choice, pool, rules.faults, None)
        mirror = route.mirror
        copy_to = mirror.subset if mirror is not None and rand() * 100.0 < mirror.percent else None
        return CallPlan(choice, pool, rules.faults, route.retry_non_idempotent, copy_to)

    def mirror_plan(self, subset: str) -> CallPlan:
        """The plan of a mirrored copy: the subset's endpoints, no faults (the primary had them)."""
        return CallPlan(RouteChoice(None, subset, f"mirror:{subset}"), self.subset_pool(subset), None, None)

    def pick(
        self,
        now: float,
        rand: Callable[[], float],
        tried: Sequence[EndpointHandle] = (),
        pool: Sequence[EndpointHandle] | None = None,
        subset: str | None = None,
    ) -> Pick | None:
        """Choose an endpoint: a due half-open trial first, else the balancer over closed endpoints, preferring
        ones this call has not tried. Raises when there is nothing to call on a first attempt; returns None on a
        retry when nothing is left."""
        handles = self.handles if pool is None else pool
        if not handles:
            if pool is not None:
                message = f"{self.name}: subset {subset!r} (chosen by the rules) has no healthy endpoints"
                reason = NoEndpointsError.SUBSET_EMPTY
            elif self.snapshot is None:
                message = f"{self.name}: service unknown to discovery"
                reason = NoEndpointsError.UNKNOWN_SERVICE
            elif self.excluded:  # discovery lists instances, and this process may call none of them
                message = f"{self.name}: no endpoint this process can call: {self.excluded}"
                reason = NoEndpointsError.ALL_SKIPPED
            else:
                message = f"{self.name}: no healthy endpoints (discovery lists none)"
                reason = NoEndpointsError.NONE_LISTED
            raise NoEndpointsError(message, service=self.name, reason=reason)
        if self.zone:
            handles = self._in_zone(handles, subset if pool is not None else None, tried)
        if self._not_closed == 0 and not tried:
            return self._balanced(handles, now, rand)
        for handle in handles:
            breaker = handle.breaker
            if breaker.state != CLOSED and handle not in tried:
                admitted = breaker.admit(now)
                if admitted is None:
                    return Pick(handle, True)
        closed = [h for h in handles if h.breaker.state == CLOSED]
        panic = self.policy.circuit_breaker.panic_threshold_percent
        if panic and len(closed) * 100 < len(handles) * panic:
            closed = list(handles)  # too few healthy to carry the load alone: balance over all (Envoy's panic mode)
        fresh = [h for h in closed if h not in tried] if tried else closed
        candidates = fresh or closed
        if candidates:
            return self._balanced(candidates, now, rand)
        if tried:
            return None
        waits = ", ".join(f"{h.label} reopens in {h.breaker.reopens_in(now):.1f}s" for h in handles)
        raise CircuitOpenError(
            f"{self.name}: all {len(handles)} endpoints are ejected by their circuit breakers ({waits})",
            service=self.name,
        )

    def _in_zone(
        self, handles: Sequence[EndpointHandle], key: str | None, tried: Sequence[EndpointHandle]
    ) -> Sequence[EndpointHandle]:
        """Priorities by zone, as xDS's failover: the caller's zone's endpoints while one of them is healthy and
        untried by this call; else all of them (the caller's zone included, so an ejected one still gets its
        trial)."""
        local = self._zone_pools.get(key)
        if local is None:
            local = self._zone_pools[key] = tuple(h for h in handles if h.endpoint.zone == self.zone)
        if not local or len(local) == len(handles):
            return handles
        for handle in local:
            if handle.breaker.state == CLOSED and handle not in tried:
                return local
        return handles

    def _balanced(self, candidates: Sequence[EndpointHandle], now: float, rand: Callable[[], float]) -> Pick:
        if self.weighted:
            candidates = weight_class(candidates, rand)
        index, rival, cost, rival_cost = self.balancer.choose(candidates, now, rand)
        return Pick(candidates[index], False, cost, candidates[rival] if rival >= 0 else None, rival_cost)
