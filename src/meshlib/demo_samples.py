"""The demo's traffic samples and their summary (rate, success, latency percentiles, versions seen), shared by the
demo's checks and its live view."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Any


@dataclass
class Sample:
    at: float
    ok: bool
    latency: float
    version: str | None


def summarize(samples: list[Sample], seconds: float) -> dict[str, Any]:
    if not samples:
        return {"rps": 0.0, "success": 0.0, "p50": 0.0, "p99": 0.0, "versions": Counter(), "n": 0, "failed": 0}
    latencies = sorted(s.latency for s in samples)
    ok = sum(1 for s in samples if s.ok)
    return {
        "n": len(samples),
        "failed": len(samples) - ok,
        "rps": len(samples) / max(seconds, 1e-9),
        "success": ok / len(samples),
        "p50": statistics.median(latencies) * 1000,
        "p99": latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000,
        "versions": Counter(s.version for s in samples if s.version),
    }
