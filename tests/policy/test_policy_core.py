"""The pure policy core, driven by tables of outcomes with a fake clock and a scripted random source."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable

import httpcore
import pytest

import meshlib
from meshlib.client.errors import classify_error
from meshlib.endpoints import Endpoint, EndpointSet
from meshlib.policy.balancer import LoadStats, P2CPeakEwma, RoundRobin
from meshlib.policy.breaker import CLOSED, HALF_OPEN, OPEN, EndpointBreaker
from meshlib.policy.classify import Kind, classify_status
from meshlib.policy.config import BreakerPolicy, RetryBudgetPolicy, RetryPolicy, ServicePolicy
from meshlib.policy.deadline import call_deadline, parse_deadline_header, to_epoch_millis
from meshlib.policy.flow import Done, Result, Send, Sleep, call_flow
from meshlib.policy.retry import RetryBudget
from meshlib.policy.service import ServiceState
from meshlib.propagation import incoming_deadline, outbound_deadline


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def state(ports: Iterable[int] = (1, 2, 3), policy: ServicePolicy | None = None, clock: FakeClock | None = None):
    clock = clock or FakeClock()
    s = ServiceState("svc", clock, policy or ServicePolicy())
    s.set_endpoints(EndpointSet.of("svc", [Endpoint("10.0.0.1", p) for p in ports]))
    return s, clock


OK = Result(classify_status(200))
E503 = Result(classify_status(503))
E404 = Result(classify_status(404))
REFUSED = Result(classify_error(httpcore.ConnectError("refused")), httpcore.ConnectError("refused"))
RESET = Result(classify_error(httpcore.ReadError("reset")), httpcore.ReadError("reset"))


def run(
    s: ServiceState,
    clock: FakeClock,
    outcomes: list[Result],
    *,
    method: str = "GET",
    replayable: bool = True,
    deadline: float | None = None,
    latency: float = 0.01,
    rand=lambda: 0.5,
    explain: bool = True,
):
    """Drive one call; returns (the actions it yielded, Done)."""
    flow = call_flow(
        s, method=method, replayable=replayable, deadline=deadline, clock=clock, rand=rand, explain=explain
    )
    actions: list[object] = []
    outcomes = list(outcomes)
    try:
        action = next(flow)
        while True:
            actions.append(action)
            if isinstance(action, Send):
                clock.advance(latency)
                action = flow.send(outcomes.pop(0))
            else:
                assert isinstance(action, Sleep)
                clock.advance(action.seconds)
                action = next(flow)
    except StopIteration as stop:
        done: Done = stop.value
    return actions, done


def sends(actions: list[object]) -> list[Send]:
    return [a for a in actions if isinstance(a, Send)]


# -- classification ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "kind", "key", "failure", "reached"),
    [
        (OK, Kind.SUCCESS, "200", False, True),
        (E404, Kind.CLIENT_ERROR, "404", False, True),
        (E503, Kind.SERVER_ERROR, "503", True, True),
        (REFUSED, Kind.CONNECT_FAILURE, "connect-failure", True, False),
        (RESET, Kind.RESET, "reset", True, True),
        (Result(classify_error(httpcore.ReadTimeout("t"))), Kind.TIMEOUT, "timeout", True, True),
        (Result(classify_error(ValueError("bad body"))), Kind.LOCAL_ERROR, "local-error", False, False),
    ],
)
def test_one_classifier(outcome, kind, key, failure, reached):
    v = outcome.verdict
    assert (v.kind, v.key, v.is_failure, v.reached_server) == (kind, key, failure, reached)


# -- retries -----------------------------------------------------------------------------------------

RETRY_TABLE = [
    # outcomes, method, replayable, expected number of attempts, final status/error
    ([OK], "GET", True, 1, 200),
    ([E503, OK], "GET", True, 2, 200),
    ([E503, E503, E503], "GET", True, 3, 503),
    ([E404], "GET", True, 1, 404),
    ([E503], "POST", True, 1, 503),  # not idempotent, may have reached the server
    ([RESET], "POST", True, 1, meshlib.UnavailableError),
    ([REFUSED, OK], "POST", True, 2, 200),  # never reached a server: safe to retry
    ([RESET, OK], "PUT", True, 2, 200),  # idempotent
    ([E503], "GET", False, 1, 503),  # streamed body cannot be replayed
    ([REFUSED, REFUSED, REFUSED], "GET", True, 3, meshlib.UnavailableError),
]


@pytest.mark.parametrize(("outcomes", "method", "replayable", "attempts", "final"), RETRY_TABLE)
def test_retry_table(outcomes, method, replayable, attempts, final):
    s, clock = state()
    actions, done = run(s, clock, outcomes, method=method, replayable=replayable)
    tried = sends(actions)
    assert len(tried) == attempts
    assert [a.attempt for a in tried] == list(range(1, attempts + 1))
    if isinstance(final, int):
        assert done.error is None and done.result.verdict.status == final
    else:
        assert isinstance(done.error, final)
        assert "svc" in str(done.error) and "10.0.0.1:" in str(done.error)


def test_a_retry_goes_to_another_instance_after_a_backoff():
    s, clock = state()
    actions, _ = run(s, clock, [E503, E503, OK])
    endpoints = [a.endpoint for a in sends(actions)]
    assert len(set(endpoints)) == 3
    sleeps = [a.seconds for a in actions if isinstance(a, Sleep)]
    assert len(sleeps) == 2 and all(0 < d <= 0.25 for d in sleeps)
    assert sleeps[1] > sleeps[0]  # exponential


def test_retry_non_idempotent_when_the_rule_says_so():
    s, clock = state(policy=ServicePolicy(retries=RetryPolicy(retry_non_idempotent=True)))
    actions, done = run(s, clock, [E503, OK], method="POST")
    assert len(sends(actions)) == 2 and done.error is None


def test_retries_on_list_is_respected():
    s, clock = state(policy=ServicePolicy(retries=RetryPolicy(on=frozenset({"connect-failure"}))))
    actions, _ = run(s, clock, [E503])
    assert len(sends(actions)) == 1
    s, clock = state(policy=ServicePolicy(retries=RetryPolicy(on=frozenset({"5xx"}))))
    actions, _ = run(s, clock, [Result(classify_status(500)), OK])
    assert len(sends(actions)) == 2


def test_retry_budget_window_and_reserve():
    clock = FakeClock(0.0)
    budget = RetryBudget(RetryBudgetPolicy(ratio=0.2, min_per_second=1, window=10))
    assert sum(budget.try_withdraw(clock()) for _ in range(20)) == 10  # the reserve: 1/s over 10 s
    for _ in range(100):
        budget.deposit(clock())
    assert sum(budget.try_withdraw(clock()) for _ in range(100)) == 20  # plus 20% of 100 requests
    clock.advance(11)  # the window slides: all of that is forgotten
    assert budget.balance(clock()) == 10


def test_budget_exhausted_is_a_typed_error():
    policy = ServicePolicy(retries=RetryPolicy(budget=RetryBudgetPolicy(ratio=0.0, min_per_second=0)))
    s, clock = state(policy=policy)
    actions, done = run(s, clock, [REFUSED])
    assert len(sends(actions)) == 1
    assert isinstance(done.error, meshlib.RetryBudgetExhaustedError)
    actions, done = run(s, clock, [E503])  # a response is still a response: the caller gets the 503
    assert done.error is None and done.result.verdict.status == 503


# -- deadlines ---------------------------------------------------------------------------------------


def test_per_try_timeout_is_capped_by_the_deadline():
    policy = ServicePolicy(timeout=1.0, retries=RetryPolicy(per_try_timeout=0.4))
    s, clock = state(policy=policy)
    deadline = call_deadline(clock(), policy.timeout, 0.0, None)
    timeout = Result(classify_error(httpcore.ReadTimeout("slow")), httpcore.ReadTimeout("slow"))
    actions, done = run(s, clock, [timeout, timeout, timeout], deadline=deadline, latency=0.4)
    budgets = [a.timeout for a in sends(actions)]
    assert budgets[0] == pytest.approx(0.4)
    assert budgets[-1] < 0.4  # the last try only gets what is left
    assert isinstance(done.error, meshlib.DeadlineExceededError)


def test_deadline_already_passed_sends_nothing():
    s, clock = state()
    actions, done = run(s, clock, [], deadline=clock() - 1)
    assert actions == [] and isinstance(done.error, meshlib.DeadlineExceededError)


def test_incoming_deadline_caps_the_call_deadline():
    assert call_deadline(now=10.0, timeout=5.0, wall_now=2000.0, incoming=2000.5) == pytest.approx(10.5)
    assert call_deadline(now=10.0, timeout=5.0, wall_now=2000.0, incoming=None) == 15.0
    assert call_deadline(now=10.0, timeout=None, wall_now=2000.0, incoming=2003.0) == pytest.approx(13.0)
    assert to_epoch_millis(10.5, 10.0, 2000.0) == 2000500
    assert parse_deadline_header(b"2000500", wall_now=2000.0) == 2000.5
    with pytest.raises(ValueError, match="x-mesh-deadline"):
        parse_deadline_header("soon", wall_now=2000.0)


def test_the_shells_read_the_incoming_deadline_from_the_request_being_handled():
    import time

    def inner() -> float | None:
        incoming_deadline.set(time.time() + 0.5)  # epoch seconds, as the server side sets it
        return outbound_deadline(100.0, 5.0)

    assert contextvars.copy_context().run(inner) == pytest.approx(100.5, abs=0.05)
    assert outbound_deadline(100.0, 5.0) == 105.0


# -- circuit breaking --------------------------------------------------------------------------------


def test_breaker_ejects_after_consecutive_failures_then_one_half_open_trial():
    # panic off: a one-instance pool fails fast once ejected (the default, 50%, keeps it in rotation)
    policy = ServicePolicy(
        circuit_breaker=BreakerPolicy(consecutive_failures=5, open_for=30, panic_threshold_percent=0)
    )
    s, clock = state(ports=[1], policy=policy)
    for _ in range(5):
        run(s, clock, [E503, E503, E503])
    handle = s.handles[0]
    assert handle.breaker.state == OPEN
    actions, done = run(s, clock, [])
    assert actions == [] and isinstance(done.error, meshlib.CircuitOpenError)
    assert "reopens in" in str(done.error)

    clock.advance(30)
    # Two concurrent calls: only one becomes the half-open trial; the other fails fast.
    trial = call_flow(s, method="GET", replayable=True, deadline=None, clock=clock, rand=lambda: 0.5)
    first = next(trial)
    assert isinstance(first, Send)
    _, other = run(s, clock, [])
    assert isinstance(other.error, meshlib.CircuitOpenError)
    with pytest.raises(StopIteration):
        trial.send(OK)
    assert handle.breaker.state == CLOSED
    assert run(s, clock, [OK])[1].error is None


def test_only_consecutive_failures_eject_a_success_between_them_starts_the_count_again():
    """The breaker's hot path skips pybreaker for a success when nothing is counted: its own failure count must
    follow pybreaker's, or a success between failures would not reset it."""
    breaker = EndpointBreaker(BreakerPolicy(consecutive_failures=3, open_for=30), FakeClock())
    for failure in (True, True, False, True, True):
        breaker.record(failure, trial=False)
    assert breaker.state == CLOSED, "two, a success, two: never three in a row"
    breaker.record(False, trial=False)
    breaker.record(False, trial=False)  # nothing counted: the hot path
    for _ in range(2):
        breaker.record(True, trial=False)
    assert breaker.state == CLOSED
    breaker.record(True, trial=False)
    assert breaker.state == OPEN


def test_failed_trial_reopens_and_cancelled_trial_frees_the_gate():
    policy = ServicePolicy(
        circuit_breaker=BreakerPolicy(consecutive_failures=1, open_for=10, panic_threshold_percent=0)
    )
    s, clock = state(ports=[1], policy=policy)
    run(s, clock, [REFUSED])
    breaker = s.handles[0].breaker
    assert breaker.state == OPEN
    clock.advance(10)
    run(s, clock, [REFUSED])
    assert breaker.state == OPEN and breaker.reopens_in(clock()) == pytest.approx(10, abs=0.1)
    clock.advance(10)
    flow = call_flow(s, method="GET", replayable=True, deadline=None, clock=clock, rand=lambda: 0.5)
    assert isinstance(next(flow), Send)
    flow.close()  # the caller was cancelled mid-attempt
    assert breaker.state in (OPEN, HALF_OPEN)
    assert run(s, clock, [OK])[1].error is None  # the gate was handed back: a new trial goes through
    assert breaker.state == CLOSED


def test_ejected_endpoints_are_skipped_while_others_serve():
    policy = ServicePolicy(circuit_breaker=BreakerPolicy(consecutive_failures=2, open_for=30))
    s, clock = state(ports=[1, 2], policy=policy)
    bad = s.handles[0]
    for _ in range(2):
        bad.breaker.record(True, False)
    assert bad.breaker.state == OPEN
    for _ in range(20):
        actions, _done = run(s, clock, [OK])
        assert sends(actions)[0].endpoint.port == 2


def test_endpoint_state_survives_discovery_updates():
    s, clock = state(ports=[1, 2])
    s.handles[0].load.observe(0.5, clock())
    s.set_endpoints(EndpointSet.of("svc", [Endpoint("10.0.0.1", p) for p in (1, 2, 3)]))
    assert [h.endpoint.port for h in s.handles] == [1, 2, 3]
    assert s.handles[0].load.ewma == 0.5
    s.set_endpoints(EndpointSet.of("svc", []))
    _actions, done = run(s, clock, [])
    assert isinstance(done.error, meshlib.NoEndpointsError)


# -- balancing ---------------------------------------------------------------------------------------


def test_peak_ewma_jumps_up_decays_down():
    load = LoadStats(now=0.0, tau=10.0)
    load.observe(0.010, 0.0)
    load.observe(0.100, 0.1)
    assert load.ewma == 0.100  # peak: at once
    load.observe(0.010, 10.1)
    assert 0.010 < load.ewma < 0.100  # then pulled down with time
    assert load.latency(100.0) < 0.001  # an idle endpoint is forgiven


def test_p2c_prefers_lower_cost_and_counts_outstanding():
    class H:
        def __init__(self, ewma: float, outstanding: int = 0) -> None:
            self.load = LoadStats(0.0)
            self.load.ewma = ewma
            self.load.outstanding = outstanding

    p2c = P2CPeakEwma()
    fast, slow = H(0.001), H(0.050)
    rolls = iter([0.1, 0.9] * 10)
    assert all(p2c.pick([fast, slow], 0.0, lambda: next(rolls)) == 0 for _ in range(5))
    busy = H(0.001, outstanding=100)
    assert p2c.pick([busy, slow], 0.0, iter([0.1, 0.9]).__next__) == 1
    cold_busy, cold_idle = H(0.0, outstanding=3), H(0.0)
    assert p2c.pick([cold_busy, cold_idle], 0.0, iter([0.1, 0.9]).__next__) == 1


def test_round_robin_and_balancer_override():
    rr = RoundRobin()
    picks = [rr.pick([object(), object(), object()], 0.0, lambda: 0.0) for _ in range(6)]  # type: ignore[list-item]
    assert picks == [0, 1, 2, 0, 1, 2]
    s, clock = state(policy=ServicePolicy(load_balancer="round_robin"))
    ports = [sends(run(s, clock, [OK])[0])[0].endpoint.port for _ in range(3)]
    assert sorted(ports) == [1, 2, 3]
    s.set_policy(ServicePolicy(load_balancer="least_request"))
    assert s.balancer.name == "least_request"


def test_a_recovered_endpoint_is_not_starved_by_its_old_failure_penalty():
    """The scenario from the field: b answers 503 until ejected, recovers (its probe closes the breaker), then c
    turns 150 ms slow. b must take c's share at once, not after its 1 s failure penalty decays (10-30 s)."""
    policy = ServicePolicy(
        retries=RetryPolicy(attempts=1), circuit_breaker=BreakerPolicy(consecutive_failures=3, open_for=1.0)
    )
    s, clock = state(policy=policy)
    _a, b, c = sorted(s.handles, key=lambda h: h.endpoint.port)
    rng = iter([i / 997 % 1 for i in range(1, 100_000)])

    def call(result_for) -> int:  # one sequential call; returns the port it went to
        flow = call_flow(s, method="GET", replayable=True, deadline=None, clock=clock, rand=lambda: next(rng))
        action = next(flow)
        port = action.endpoint.port
        latency, result = result_for(port)
        clock.advance(latency)
        with contextlib.suppress(StopIteration):
            flow.send(result)
        return port

    # b fails until its breaker opens
    while b.breaker.state != OPEN:
        call(lambda port: (0.01, E503 if port == b.endpoint.port else OK))
    clock.advance(1.5)  # open_for passes; b has recovered: its probe succeeds and closes the breaker
    while b.breaker.state != CLOSED:
        call(lambda port: (0.01, OK))
    assert b.load.latency(clock()) < 0.05  # revived with what the probe measured, not the 1 s penalty
    # c turns 150 ms slow: over the next 100 calls, b takes its share and c falls well under a third
    ports = [call(lambda port: (0.15 if port == c.endpoint.port else 0.01, OK)) for _ in range(100)]
    assert ports.count(b.endpoint.port) > 25, ports
    assert ports.count(c.endpoint.port) < 15, ports


# -- ejection cap and panic threshold (Envoy's max_ejection_percent, healthy_panic_threshold) -------------------


def _fail_everywhere(s: ServiceState, clock: FakeClock, calls: int) -> None:
    """Every attempt on every endpoint fails (retries off, so one attempt per call)."""
    for _ in range(calls):
        run(s, clock, [E503], rand=lambda: 0.0)
        clock.advance(0.001)


@pytest.mark.parametrize(
    ("endpoints", "percent", "ejected"),
    [
        (4, 50.0, 2),  # the default: half
        (3, 50.0, 1),  # 1.5 rounds down
        (1, 50.0, 1),  # at least one may always be ejected
        (4, 0.0, 1),  # ... even at 0%
        (4, 100.0, 4),  # the old behaviour: all
        (10, 10.0, 1),  # Envoy's own default
    ],
)
def test_max_ejection_percent_caps_how_many_endpoints_are_ejected(endpoints, percent, ejected):
    policy = ServicePolicy(
        retries=RetryPolicy(attempts=1),
        load_balancer="round_robin",
        circuit_breaker=BreakerPolicy(consecutive_failures=2, open_for=60, max_ejection_percent=percent),
    )
    s, clock = state(ports=range(1, endpoints + 1), policy=policy)
    _fail_everywhere(s, clock, 20 * endpoints)
    assert sum(h.breaker.state == OPEN for h in s.handles) == ejected
    assert not s.may_eject() or ejected == endpoints


def test_an_endpoint_kept_by_the_cap_is_ejected_once_another_recovers():
    policy = ServicePolicy(
        retries=RetryPolicy(attempts=1),
        load_balancer="round_robin",
        circuit_breaker=BreakerPolicy(consecutive_failures=2, open_for=10, max_ejection_percent=50),
    )
    s, clock = state(ports=(1, 2), policy=policy)
    _fail_everywhere(s, clock, 10)
    first = next(h for h in s.handles if h.breaker.state == OPEN)
    other = next(h for h in s.handles if h is not first)
    assert other.breaker.state == CLOSED
    clock.advance(10)
    # the ejected one's trial succeeds and closes it; the other, still failing, may now be ejected
    flow = call_flow(s, method="GET", replayable=True, deadline=None, clock=clock, rand=lambda: 0.0)
    send = next(flow)
    assert send.endpoint == first.endpoint
    with contextlib.suppress(StopIteration):
        flow.send(OK)
    assert first.breaker.state == CLOSED
    for _ in range(4):
        run(s, clock, [E503], rand=lambda: 0.0)
    assert other.breaker.state == OPEN


def test_below_the_panic_threshold_traffic_goes_to_every_endpoint():
    policy = ServicePolicy(
        retries=RetryPolicy(attempts=1),
        load_balancer="round_robin",
        circuit_breaker=BreakerPolicy(
            consecutive_failures=1, open_for=60, max_ejection_percent=100, panic_threshold_percent=50
        ),
    )
    s, clock = state(ports=(1, 2, 3, 4), policy=policy)
    for handle in s.handles[:3]:  # eject three of four
        handle.breaker.record(True, False)
    assert [h.breaker.state for h in s.handles] == [OPEN, OPEN, OPEN, CLOSED]
    picked = {run(s, clock, [OK])[0][0].endpoint.port for _ in range(8)}
    assert picked == {1, 2, 3, 4}, "25% healthy < 50%: balanced over all"
    off = ServicePolicy(
        circuit_breaker=BreakerPolicy(consecutive_failures=1, max_ejection_percent=100, panic_threshold_percent=0)
    )
    s.set_policy(off)
    assert {run(s, clock, [OK])[0][0].endpoint.port for _ in range(8)} == {4}, "no panic threshold: only healthy"


def test_a_late_answer_does_not_close_an_open_breaker_before_its_time():
    """pybreaker's own open timeout runs on the injected clock (no wall clock in the core)."""
    from meshlib.policy.breaker import EndpointBreaker

    clock = FakeClock()
    breaker = EndpointBreaker(BreakerPolicy(consecutive_failures=2, open_for=30), clock)
    breaker.record(True, False)
    breaker.record(True, False)
    assert breaker.state == OPEN
    clock.advance(29)
    breaker.record(False, False)  # an attempt sent before the ejection answers late: still ejected
    assert breaker.state == OPEN
    clock.advance(2)
    assert breaker.admit(clock()) is None  # the one trial
    breaker.record(False, True)
    assert breaker.state == CLOSED


# -- hedged requests ----------------------------------------------------------------------------------

from meshlib.policy.config import HedgingPolicy  # noqa: E402
from meshlib.policy.flow import HEDGE_DUE, Wait  # noqa: E402


def hedged_state(hedging: HedgingPolicy, ports=(1, 2, 3), deposits: int = 100):
    s, clock = state(ports=ports, policy=ServicePolicy(hedging=hedging))
    assert s.hedger is not None
    for _ in range(deposits):  # earlier requests: the hedge budget is a share of them
        s.hedger.budget.deposit(clock())
    return s, clock


def start(s, clock, method="GET", replayable=True):
    flow = call_flow(s, method=method, replayable=replayable, deadline=None, clock=clock, rand=lambda: 0.5)
    return flow, next(flow)


def test_no_hedge_when_the_first_attempt_answers_in_time():
    s, clock = hedged_state(HedgingPolicy(delay=0.05))
    flow, send = start(s, clock)
    assert isinstance(send, Send) and send.hedge_after == 0.05
    clock.advance(0.01)
    with pytest.raises(StopIteration) as stop:
        flow.send(Result(classify_status(200), attempt=send.attempt))
    done = stop.value.value
    assert done.winner == 1 and done.hedges == 0 and done.error is None


def test_a_slow_first_attempt_gets_a_backup_on_another_instance_and_the_first_answer_wins():
    s, clock = hedged_state(HedgingPolicy(delay=0.05))
    flow, first = start(s, clock)
    clock.advance(0.05)
    backup = flow.send(HEDGE_DUE)
    assert isinstance(backup, Send) and backup.endpoint != first.endpoint and backup.attempt == 2
    assert backup.hedge_after is None, "max_attempts 2: no third"
    assert sum(h.load.outstanding for h in s.handles) == 2
    clock.advance(0.01)
    with pytest.raises(StopIteration) as stop:
        flow.send(Result(classify_status(200), attempt=2))
    done = stop.value.value
    assert done.winner == 2 and done.hedges == 1
    assert sum(h.load.outstanding for h in s.handles) == 0, "the loser, cancelled, is no longer counted"
    slow = next(h for h in s.handles if h.endpoint == first.endpoint)
    assert slow.load.ewma == pytest.approx(0.06), "the loser is charged at least what it took until cancelled"


def test_a_failed_attempt_waits_for_the_other_one_in_flight():
    s, clock = hedged_state(HedgingPolicy(delay=0.05))
    flow, _first = start(s, clock)
    clock.advance(0.05)
    flow.send(HEDGE_DUE)
    clock.advance(0.01)
    waiting = flow.send(Result(classify_error(httpcore.ConnectError("x")), httpcore.ConnectError("x"), attempt=2))
    assert isinstance(waiting, Wait), "the first attempt may still answer"
    with pytest.raises(StopIteration) as stop:
        flow.send(Result(classify_status(200), attempt=1))
    assert stop.value.value.winner == 1 and stop.value.value.error is None


def test_the_hedge_budget_caps_backups():
    s, clock = hedged_state(HedgingPolicy(delay=0.05, budget_percent=10), deposits=0)
    hedged = 0
    for _ in range(100):
        flow, _first = start(s, clock)
        clock.advance(0.05)
        nxt = flow.send(HEDGE_DUE)
        if isinstance(nxt, Send):
            hedged += 1
            with contextlib.suppress(StopIteration):
                flow.send(Result(classify_status(200), attempt=nxt.attempt))
        else:
            assert isinstance(nxt, Wait) and nxt.hedge_after is None
            with contextlib.suppress(StopIteration):
                flow.send(Result(classify_status(200), attempt=1))
        flow.close()
    assert 5 <= hedged <= 10, hedged


def test_an_adaptive_delay_needs_samples_then_follows_the_percentile():
    s, clock = hedged_state(HedgingPolicy(percentile=95.0))
    flow, send = start(s, clock)
    assert send.hedge_after is None, "no basis yet: no hedging"
    flow.close()
    for i in range(128):  # latencies 1..128 ms (the percentile is recomputed every 32 samples)
        run(s, clock, [OK], latency=(i + 1) / 1000)
    _, send = start(s, clock)
    assert send.hedge_after == pytest.approx(0.122, abs=0.0015)


def test_requests_that_cannot_be_replayed_or_repeated_are_never_hedged():
    s, clock = hedged_state(HedgingPolicy(delay=0.05))
    _, send = start(s, clock, replayable=False)
    assert send.hedge_after is None
    _, send = start(s, clock, method="POST")
    assert send.hedge_after is None
    flow = call_flow(s, method="POST", replayable=True, deadline=None, clock=clock, rand=lambda: 0.5, hedgeable=True)
    assert next(flow).hedge_after == 0.05, "gRPC: hedging configured means the call may run twice"


def test_a_flow_that_explains_nothing_decides_the_same():
    """``explain=False`` (nobody reads the decision log) builds no entry and changes nothing else: the same sends,
    sleeps, retries and outcome, the same endpoint load, breaker and budget afterwards."""
    outcomes = [REFUSED, E503, OK, OK, REFUSED, REFUSED, REFUSED, E404]
    seen = []
    for explain in (True, False):
        s, clock = state(policy=ServicePolicy(load_balancer="round_robin"))
        calls = []
        left = list(outcomes)
        while left:
            actions, done = run(s, clock, left, explain=explain)
            used = len(sends(actions))
            left = left[used:]
            calls.append(
                (
                    [(a.endpoint.port, a.attempt) if isinstance(a, Send) else ("sleep", a.seconds) for a in actions],
                    type(done.error).__name__ if done.error is not None else None,
                    done.attempts,
                )
            )
            assert bool(done.decisions) is explain and (not explain or len(done.decisions) == used)
        endpoints = [(h.label, h.load.ewma, h.load.sent, h.breaker.state) for h in s.handles]
        seen.append((calls, endpoints, s.budget.balance(clock())))
    assert seen[0] == seen[1]
