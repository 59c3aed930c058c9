"""Which OpenTelemetry exporters ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER`` name, as the SDK reads them.

``otlp`` is no package's entry point: the SDK maps it to ``otlp_proto_grpc`` or ``otlp_proto_http`` by
``OTEL_EXPORTER_OTLP_{TRACES,METRICS}_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL``. Looked up as-is it found nothing
and exported nothing, silently. Here it is mapped the same way; with no protocol set, to whichever OTLP exporter is
installed (gRPC first, the Python SDK's default). A name that finds no exporter is said once, with the package to
install; telemetry never stops the process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Mapping
from typing import Any, Literal

log = logging.getLogger("meshlib.telemetry")

Signal = Literal["traces", "metrics"]

_EXPORTER_VAR = {"traces": "OTEL_TRACES_EXPORTER", "metrics": "OTEL_METRICS_EXPORTER"}
_PROTOCOL_VAR = {"traces": "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "metrics": "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"}
_GROUP = {"traces": "opentelemetry_traces_exporter", "metrics": "opentelemetry_metrics_exporter"}
BY_PROTOCOL = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}
PACKAGE = {
    "otlp_proto_grpc": "opentelemetry-exporter-otlp-proto-grpc",
    "otlp_proto_http": "opentelemetry-exporter-otlp-proto-http",
}
#: names that are no SDK exporter: ``prometheus`` is served by the instance itself at /-/mesh/metrics
_NOT_EXPORTERS = frozenset({"", "none", "prometheus"})


def requested(signal: Signal, environ: Mapping[str, str] = os.environ) -> list[str]:
    """The exporter names the environment asks for (``none`` and ``prometheus`` are not SDK exporters)."""
    raw = environ.get(_EXPORTER_VAR[signal], "")
    return [n.strip() for n in raw.split(",") if n.strip().lower() not in _NOT_EXPORTERS]


def resolve(signal: Signal, names: list[str], protocol: str, installed: Collection[str]) -> tuple[list[str], list[str]]:
    """Pure: the entry point names to load for ``names``, and a warning for each one that cannot be."""
    var = _EXPORTER_VAR[signal]
    chosen: list[str] = []
    warnings: list[str] = []
    for asked in names:
        name = asked
        if name == "otlp":
            if protocol:
                if protocol not in BY_PROTOCOL:
                    warnings.append(
                        f"{_PROTOCOL_VAR[signal]} or OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: not an OTLP protocol "
                        f"this SDK exports with (use grpc or http/protobuf); no {signal} are exported"
                    )
                    continue
                name = BY_PROTOCOL[protocol]
            else:
                name = next((n for n in ("otlp_proto_grpc", "otlp_proto_http") if n in installed), "otlp_proto_grpc")
                if name not in installed:
                    warnings.append(
                        f"{var}=otlp: no OTLP exporter is installed, so no {signal} are exported; "
                        "pip install 'meshlib[otlp]' (or opentelemetry-exporter-otlp-proto-http)"
                    )
                    continue
        if name not in installed:
            package = PACKAGE.get(name)
            hint = f"pip install {package}" if package else f"installed: {', '.join(sorted(installed)) or 'none'}"
            said = f"{var} names {asked!r}" if asked == name else f"{var}=otlp over {protocol}"
            warnings.append(f"{said}: that exporter is not installed, so no {signal} are exported there; {hint}")
            continue
        if name not in chosen:
            chosen.append(name)
    return chosen, warnings


def exporters(signal: Signal, environ: Mapping[str, str] = os.environ) -> list[Any]:
    """Exporter instances for ``signal`` as the environment says; problems are logged, never raised."""
    names = requested(signal, environ)
    if not names:
        return []
    from importlib.metadata import entry_points  # only with an exporter asked for: 2 MB of RSS otherwise saved

    group = entry_points(group=_GROUP[signal])
    installed = {ep.name: ep for ep in group}
    protocol = (environ.get(_PROTOCOL_VAR[signal]) or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "").strip()
    chosen, warnings = resolve(signal, names, protocol, installed)
    for warning in warnings:
        log.warning("meshlib: %s", warning)
    made: list[Any] = []
    for name in chosen:
        try:
            made.append(installed[name].load()())
        except Exception as exc:  # a bad endpoint or header variable: say so, keep serving
            log.warning(
                "meshlib: the %s exporter %r could not start: %s%s", signal, name, exc, proto_conflict_hint(exc)
            )
    return made


def proto_conflict_hint(exc: Exception) -> str:
    """What to do when the OTLP protos were overwritten by the old copy ``xds-protos`` ships (grpc/grpc#42926:
    whichever of the two packages is installed last owns ``opentelemetry/proto``)."""
    if "InstrumentationScope" not in str(exc):
        return ""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pinned = f"opentelemetry-proto=={version('opentelemetry-proto')}"
    except PackageNotFoundError:
        pinned = "opentelemetry-proto"
    return (
        f" (the xds-protos package overwrote OpenTelemetry's OTLP protos with an old copy: "
        f"pip install --force-reinstall --no-deps {pinned})"
    )
