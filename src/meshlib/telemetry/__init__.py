"""Tracing, metrics and access logs for every mesh call, owned by the Mesh (one set per process)."""

from __future__ import annotations

from opentelemetry.trace import TracerProvider

from .accesslog import AccessLog
from .metrics import Labels, MeshMetrics, status_class
from .tracing import MeshTracer, configure_from_env


class Telemetry:
    def __init__(
        self,
        service: str,
        *,
        tracer_provider: TracerProvider | None = None,
        access_log: bool = False,
        access_log_sample: float = 1.0,
    ) -> None:
        if tracer_provider is None:
            configure_from_env(service)
        self.service = service
        self.tracer = MeshTracer(tracer_provider)
        self.metrics = MeshMetrics(service)
        self.access = AccessLog(access_log, access_log_sample)

    def close(self) -> None:
        self.metrics.shutdown()


__all__ = ["AccessLog", "Labels", "MeshMetrics", "MeshTracer", "Telemetry", "status_class"]
