"""The decision log: one compact entry per attempt of a call, saying why it went where it went and what came of it.

The flows fill it as they decide (which endpoint and what the balancer weighed, the breaker's state, the verdict,
retry or not and why, the backoff, the retry budget's answer, a hedge sent or refused); ``Done`` carries it; the
shells' recorder writes it as span events, as the access log's ``decisions`` field and, at DEBUG, on the
``meshlib.policy`` logger. Building an entry is a few attribute stores: the text is made only when it is written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("meshlib.policy")


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3g} ms"


@dataclass(init=False)
class Decision:
    """One attempt's entry. Built on every call: ``__init__`` sets only what is known when the attempt is sent and
    differs from the default, and every other field reads its class default until a flow writes it (a fraction of
    the stores of a dataclass's own ``__init__``)."""

    attempt: int
    endpoint: str
    #: The balancer's cost of the chosen endpoint (latency estimate x load, seconds) and of the one it was weighed
    #: against (power-of-two-choices), when there was one.
    cost: float
    rival: str | None = None
    rival_cost: float = 0.0
    breaker: str = "closed"
    #: This attempt is the breaker's half-open trial.
    trial: bool = False
    #: A backup attempt sent while an earlier one was still in flight (hedging).
    hedge: bool = False
    verdict: str = ""
    #: The verdict was not held against the endpoint (a timeout under the caller's own, shorter limit).
    unblamed: bool = False
    retry: bool | None = None
    reason: str = ""
    backoff: float = 0.0
    #: The retry budget's answer when it was asked: retries left, and the budget's size now.
    budget_left: float | None = None
    budget_total: float = 0.0
    #: "refused (...)" when a hedge was due but not sent.
    hedge_refused: str = ""

    def __init__(
        self,
        attempt: int,
        endpoint: str,
        cost: float,
        rival: str | None = None,
        rival_cost: float = 0.0,
        breaker: str = "closed",
        trial: bool = False,
        hedge: bool = False,
    ) -> None:
        self.attempt = attempt
        self.endpoint = endpoint
        self.cost = cost
        if rival is not None:
            self.rival = rival
            self.rival_cost = rival_cost
        if breaker != "closed":
            self.breaker = breaker
        if trial:
            self.trial = trial
        if hedge:
            self.hedge = hedge

    def text(self) -> str:
        """One line: ``attempt 1 -> 10.0.0.7:8080 (cost 0.31 ms vs 10.0.0.8:8080 0.45 ms, breaker closed):
        connect-failure; retried because connect-failure, backoff 23 ms, budget 19/20 left``."""
        weighed = f"cost {_ms(self.cost)}"
        if self.rival is not None:
            weighed += f" vs {self.rival} {_ms(self.rival_cost)}"
        kind = "hedge" if self.hedge else "attempt"
        line = f"{kind} {self.attempt} -> {self.endpoint} ({weighed}, breaker {self.breaker}"
        line += ", half-open trial)" if self.trial else ")"
        if self.verdict:
            line += f": {self.verdict}"
            if self.unblamed:
                line += " (cut short by the caller's deadline: not held against the endpoint)"
        if self.retry:
            line += f"; retried because {self.verdict}, backoff {_ms(self.backoff)}"
        elif self.retry is False:
            line += f"; not retried: {self.reason}"
        if self.budget_left is not None:
            line += f", budget {max(0, int(self.budget_left))}/{int(self.budget_total)} left"
        if self.hedge_refused:
            line += f"; hedge {self.hedge_refused}"
        return line

    def event_attributes(self) -> dict[str, Any]:
        """The entry as a span event's attributes (``mesh.*``; no None values: OpenTelemetry drops them)."""
        attributes: dict[str, Any] = {
            "mesh.attempt": self.attempt,
            "mesh.endpoint": self.endpoint,
            "mesh.cost_ms": round(self.cost * 1000, 3),
            "mesh.breaker": self.breaker,
            "mesh.verdict": self.verdict,
            "mesh.decision": self.text(),
        }
        if self.rival is not None:
            attributes["mesh.rival"] = self.rival
            attributes["mesh.rival_cost_ms"] = round(self.rival_cost * 1000, 3)
        if self.retry is not None:
            attributes["mesh.retry"] = self.retry
            if self.reason:
                attributes["mesh.retry_reason"] = self.reason
        if self.budget_left is not None:
            attributes["mesh.budget_left"] = max(0, int(self.budget_left))
        if self.hedge:
            attributes["mesh.hedge"] = True
        return attributes


def log_decisions(service: str, decisions: list[Decision]) -> None:
    """The call's decisions at DEBUG on ``meshlib.policy`` (one check of the level when it is off)."""
    if decisions and logger.isEnabledFor(logging.DEBUG):
        for decision in decisions:
            logger.debug("%s: %s", service, decision.text())
