"""Golden signals (rate, success, latency percentiles) from the ``http_server_request_duration_seconds``
histograms that instances serve on ``/-/mesh/metrics``: for ``meshctl status`` and the demo's live view."""

from __future__ import annotations

import math
import re
import ssl
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

# label values may hold braces (route templates such as /items/{item_id}): match quoted strings whole
_LINE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r'(?:\{(?P<labels>(?:[^"}]|"(?:[^"\\]|\\.)*")*)\})?'
    r"\s+(?P<value>\S+)$"
)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
SERVER = "http_server_request_duration_seconds"


@dataclass
class ScrapedHistogram:
    count: float = 0.0
    errors: float = 0.0  # 5xx
    buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count

    def add(self, other: ScrapedHistogram, sign: float = 1.0) -> None:
        self.count += sign * other.count
        self.errors += sign * other.errors
        for le, c in other.buckets.items():
            self.buckets[le] = self.buckets.get(le, 0.0) + sign * c

    def quantile(self, q: float) -> float:
        """Seconds, interpolated within the bucket holding quantile ``q``, as Prometheus' ``histogram_quantile``
        and the dashboard compute it (a bucket's upper bound alone put the demo's text p50s at 5, 10, 25 ms while
        the page showed 7.3 ms); the ``+Inf`` bucket answers with the highest finite bound."""
        if self.count <= 0:
            return 0.0
        rank = q * self.count
        lower, seen = 0.0, 0.0
        for le in sorted(self.buckets):
            cumulative = self.buckets[le]
            if cumulative >= rank and cumulative > seen:
                if math.isinf(le):
                    return lower
                return lower + (le - lower) * (rank - seen) / (cumulative - seen)
            lower, seen = le, max(seen, cumulative)
        return lower


def parse(text: str) -> dict[str, ScrapedHistogram]:
    """Per service (``mesh_service``), the server histogram summed over routes, methods and callers."""
    out: dict[str, ScrapedHistogram] = defaultdict(ScrapedHistogram)
    for line in text.splitlines():
        if not line.startswith(SERVER):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        labels = dict(_LABEL.findall(m.group("labels") or ""))
        service = labels.get("mesh_service", "")
        if labels.get("mesh_mirror") == "1":  # mirrored copies: a row of their own, next to the real traffic's
            service += " (mirror)"
        value = float(m.group("value"))
        name = m.group("name")
        h = out[service]
        if name == SERVER + "_count":
            h.count += value
            if labels.get("http_response_status_class") in ("5xx", "error"):
                h.errors += value
        elif name == SERVER + "_bucket":
            le = math.inf if labels["le"] == "+Inf" else float(labels["le"])
            h.buckets[le] = h.buckets.get(le, 0.0) + value
    return dict(out)


@dataclass
class Signals:
    service: str
    rate: float
    success: float
    p50_ms: float
    p99_ms: float
    requests: float


def per_instance_delta(
    before: dict[str, dict[str, ScrapedHistogram]], after: dict[str, dict[str, ScrapedHistogram]]
) -> dict[str, ScrapedHistogram]:
    """Per service, what its instances served between two scrapes, counting only instances seen in both: an
    instance that died (or was born) in between changes the sum of cumulative counts, not the traffic."""
    out: dict[str, ScrapedHistogram] = defaultdict(ScrapedHistogram)
    for instance, services in after.items():
        old = before.get(instance)
        if old is None:
            continue
        for service, now in services.items():
            out[service].add(now)
            if service in old:
                out[service].add(old[service], -1.0)
    return dict(out)


def between(before: dict[str, ScrapedHistogram], after: dict[str, ScrapedHistogram], seconds: float) -> list[Signals]:
    """Signals over the interval between two scrapes (of the same instances, summed)."""
    rows = []
    for service, now in sorted(after.items()):
        delta = ScrapedHistogram()
        delta.add(now)
        if service in before:
            delta.add(before[service], -1.0)
        success = 1.0 - delta.errors / delta.count if delta.count > 0 else 1.0
        rows.append(
            Signals(
                service,
                delta.count / max(seconds, 1e-9),
                success,
                delta.quantile(0.5) * 1000,
                delta.quantile(0.99) * 1000,
                delta.count,
            )
        )
    return rows


def scrape(
    instances: list[dict[str, Any]], context: ssl.SSLContext | None, namespace: str = "default", timeout: float = 2.0
) -> tuple[dict[str, ScrapedHistogram], list[str]]:
    """Read ``/-/mesh/metrics`` of every instance (``{"service", "address", "port", "meta"}``) and sum per service.
    Instances in strict mTLS need ``context`` (a mesh identity's client context). Returns (histograms, problems)."""
    per_instance, problems = scrape_each(instances, context, namespace, timeout)
    total: dict[str, ScrapedHistogram] = defaultdict(ScrapedHistogram)
    for services in per_instance.values():
        for service, h in services.items():
            total[service].add(h)
    return dict(total), problems


def scrape_each(
    instances: list[dict[str, Any]], context: ssl.SSLContext | None, namespace: str = "default", timeout: float = 2.0
) -> tuple[dict[str, dict[str, ScrapedHistogram]], list[str]]:
    """As ``scrape``, per instance (keyed ``address:port``): for deltas that survive instances coming and going."""
    import httpx

    out: dict[str, dict[str, ScrapedHistogram]] = {}
    problems: list[str] = []
    for inst in instances:
        meta = inst.get("meta") or {}
        tls = meta.get("mesh_tls", "off")
        host = f"[{inst['address']}]" if ":" in str(inst["address"]) else inst["address"]
        # a gRPC instance serves its metrics on an HTTP side port
        port = meta["metrics_port"] if str(meta.get("metrics_port", "")).isdigit() else inst["port"]
        try:
            if tls == "strict" or (tls == "permissive" and context is not None):
                if context is None:
                    problems.append(f"{inst['service']} {host}:{port}: strict mTLS (give meshctl an identity)")
                    continue
                with httpx.Client(verify=context, timeout=timeout, trust_env=False) as client:
                    r = client.get(
                        f"https://{host}:{port}/-/mesh/metrics",
                        extensions={"sni_hostname": f"{inst['service']}.{namespace}.mesh"},
                    )
            else:
                r = httpx.get(f"http://{host}:{port}/-/mesh/metrics", timeout=timeout, trust_env=False)
            r.raise_for_status()
        except httpx.HTTPError as exc:
            problems.append(f"{inst['service']} {host}:{port}: {exc}")
            continue
        out[f"{host}:{port}"] = {service: h for service, h in parse(r.text).items() if service == inst["service"]}
    return out, problems
