"""``GET /v1/prometheus/targets``: every registered instance as a Prometheus HTTP service-discovery target group.

Prometheus polls it (``http_sd_configs``) and scrapes each instance's ``/-/mesh/metrics`` itself: the control plane
only says where. Each group sets ``__scheme__`` (``https`` for a strict-mTLS instance, which takes nothing else)
and ``__metrics_path__``, so one scrape job covers plaintext and strict instances alike; the ``__meta_mesh_*``
labels are there for relabelling. gRPC instances are scraped on their HTTP side port (``metrics_port``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..settings import is_service_name
from .registry import Instance
from .requests import error

if TYPE_CHECKING:
    from .app import ControlPlane

#: what every instance serves (``meshlib.inbound.METRICS``; the control plane does not load the data plane)
METRICS = "/-/mesh/metrics"


def _port(instance: Instance) -> int:
    side = str(instance.meta.get("metrics_port", ""))
    if side.isdigit() and 0 < int(side) < 65536:
        return int(side)
    return instance.port


def target_group(instance: Instance) -> dict[str, Any]:
    tls = str(instance.meta.get("mesh_tls", "off"))
    host = f"[{instance.address}]" if ":" in instance.address else instance.address
    return {
        "targets": [f"{host}:{_port(instance)}"],
        "labels": {
            "__scheme__": "https" if tls == "strict" else "http",
            "__metrics_path__": METRICS,
            "__meta_mesh_service": instance.service,
            "__meta_mesh_instance_id": instance.id,
            "__meta_mesh_tls": tls,
            "__meta_mesh_protocol": str(instance.meta.get("protocol", "http")),
        },
    }


def prometheus_routes(cp: ControlPlane) -> list[Route]:
    async def targets(request: Request) -> Response:
        wanted = request.query_params.get("service")
        if wanted is not None and not is_service_name(wanted):
            return error(400, f"service={wanted[:64]!r} is not a service name (lowercase letters, digits and '-')")
        services = cp.registry.services()
        groups = [
            target_group(instance)
            for name, items in sorted(services.items())
            if wanted is None or name == wanted
            for instance in sorted(items, key=lambda i: i.id)
        ]
        return JSONResponse(groups)

    return [Route("/v1/prometheus/targets", targets, methods=["GET"])]
