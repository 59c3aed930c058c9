"""Per-endpoint circuit breaking: pybreaker's failure accrual underneath, driven by our clock, with a half-open
gate of our own (pybreaker lets every concurrent caller through while half-open; we let exactly one trial in).

pybreaker is built to wrap a call; our attempts are I/O done by a shell elsewhere, so the breaker is consulted in
two steps: ``admit()`` when the balancer considers the endpoint, ``record()`` when the attempt's verdict is known.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pybreaker

from .config import BreakerPolicy

CLOSED = pybreaker.STATE_CLOSED
OPEN = pybreaker.STATE_OPEN
HALF_OPEN = pybreaker.STATE_HALF_OPEN

Clock = Callable[[], float]
#: Called as ``listener(old_state, new_state)`` on every transition (metrics hook in).
TransitionListener = Callable[[str, str], None]


class _AttemptFailed(Exception):
    """What we 'raise' into pybreaker to count one failed attempt."""


_FAILED = _AttemptFailed()


def _fail() -> None:
    raise _FAILED


def _succeed() -> None:
    return None


class _Instant:
    """A moment on our clock, standing in for the ``datetime`` pybreaker keeps as ``opened_at``. pybreaker asks
    ``datetime.now(UTC) < opened_at + timeout``; a datetime cannot compare itself with this object, so Python asks
    ours (``__gt__``), which answers from our clock. pybreaker's timeout thus follows the injected clock, and the
    core never reads the wall clock."""

    __slots__ = ("at", "clock")

    def __init__(self, at: float, clock: Clock) -> None:
        self.at = at
        self.clock = clock

    def __add__(self, delta: Any) -> _Instant:  # a timedelta
        return _Instant(self.at + delta.total_seconds(), self.clock)

    def __gt__(self, other: object) -> bool:  # "now < self": the moment is still ahead on our clock
        return self.at > self.clock()

    def __lt__(self, other: object) -> bool:
        return self.at < self.clock()


class _ClockStorage(pybreaker.CircuitMemoryStorage):
    """Keeps ``opened_at`` on our monotonic clock (see ``_Instant``)."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(CLOSED)
        self._clock = clock
        self.opened_mono: float | None = None
        #: the state and the failure count, as plain attributes: read on every attempt (pybreaker's are properties)
        self.now_state: str = CLOSED
        self.failures = 0

    def increment_counter(self) -> None:
        self.failures += 1
        super().increment_counter()

    def reset_counter(self) -> None:
        self.failures = 0
        super().reset_counter()

    @property
    def state(self) -> str:
        return self.now_state

    @state.setter
    def state(self, state: str) -> None:
        self.now_state = state

    @property  # type: ignore[override]  # a stand-in for pybreaker's datetime, on purpose
    def opened_at(self) -> _Instant | None:
        if self.opened_mono is None:
            return None
        return _Instant(self.opened_mono, self._clock)

    @opened_at.setter
    def opened_at(self, _value: object) -> None:
        self.opened_mono = self._clock()


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, owner: EndpointBreaker) -> None:
        self._owner = owner

    def state_change(self, cb: object, old_state: object, new_state: object) -> None:
        old = getattr(old_state, "name", str(old_state))
        new = getattr(new_state, "name", str(new_state))
        for listener in self._owner.listeners:
            listener(old, new)


class EndpointBreaker:
    __slots__ = ("_breaker", "_clock", "_gate", "_storage", "_trial", "listeners", "policy")

    def __init__(self, policy: BreakerPolicy, clock: Clock, listeners: tuple[TransitionListener, ...] = ()):
        self.policy = policy
        self._clock = clock
        self._storage = _ClockStorage(clock)
        self.listeners = listeners
        self._breaker = pybreaker.CircuitBreaker(
            fail_max=policy.consecutive_failures,
            reset_timeout=policy.open_for,
            state_storage=self._storage,
            listeners=[_Listener(self)],
        )
        self._gate = threading.Lock()
        self._trial = False

    @property
    def state(self) -> str:
        return self._storage.now_state

    def reopens_in(self, now: float) -> float:
        """Seconds until an open breaker lets a trial through (0 when it is not open)."""
        opened = self._storage.opened_mono
        if self._storage.state != OPEN or opened is None:
            return 0.0
        return max(0.0, opened + self.policy.open_for - now)

    def admit(self, now: float) -> bool | None:
        """May an attempt go to this endpoint now? True: yes, normally. None: yes, as *the* half-open trial (the
        caller must ``record`` or ``release`` it). False: no, ejected."""
        state = self._storage.state
        if state == CLOSED:
            return True
        if state == OPEN and self.reopens_in(now) > 0:
            return False
        with self._gate:
            if self._trial:
                return False
            self._trial = True
        return None

    def release(self) -> None:
        """A trial that ended without a verdict (cancelled) gives its turn back."""
        self._trial = False

    def record(self, failure: bool, trial: bool, may_eject: bool = True) -> bool:
        """Count one attempt's verdict. ``may_eject`` False: this failure may not open a closed breaker (the
        service's ejection cap is reached); it is not counted, and False is returned (an ejection refused)."""
        storage = self._storage
        if not failure and storage.now_state == CLOSED and storage.failures == 0:
            return True  # the hot path: nothing to change
        if failure and not may_eject and storage.state == CLOSED and storage.counter + 1 >= self._breaker.fail_max:
            return False
        try:
            self._breaker.call(_fail if failure else _succeed)
        except (_AttemptFailed, pybreaker.CircuitBreakerError):
            pass
        finally:
            if trial:
                self._trial = False
        return True

    def update_policy(self, policy: BreakerPolicy) -> None:
        self.policy = policy
        self._breaker.fail_max = policy.consecutive_failures
        self._breaker.reset_timeout = policy.open_for
