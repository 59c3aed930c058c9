"""``/v1/stats``: reports in (``POST /v1/stats/report``, registry credentials) and golden signals out (read-only
JSON for the dashboard, ``meshctl status`` and scripts)."""

from __future__ import annotations

import asyncio
import difflib
import json
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..wire import SECRET_HEADER
from .requests import TooLarge, error, read_body, too_large
from .stats import FORGET_AFTER, MAX_BOOK_ROWS, MAX_INSTANCES, MAX_SERIES, WINDOW, InstanceState, StatsBook
from .stats_report import MAX_REPORT_BYTES, Report, parse_report
from .stats_ring import SLOT_SECONDS, SLOTS

if TYPE_CHECKING:
    from .app import ControlPlane


def _decode_report(body: bytes) -> Report:
    return parse_report(json.loads(body or b"null"))


#: Seconds a serialised topology is served again.
TOPOLOGY_TTL = 1.0


def _authority(address: str, port: int | None) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class Views:
    """One pass over the registry and the book, grouped by service: a topology read then costs the size of what is
    held, not that times the number of services (120 hostile reports once held the loop for 21 s)."""

    def __init__(self, cp: ControlPlane, book: StatsBook) -> None:
        self.registered = cp.registry.services()
        self.reporters: dict[str, list[InstanceState]] = {}
        for state in book.instances.values():
            self.reporters.setdefault(state.report.service, []).append(state)
        wanted = {(name, _authority(i.address, i.port)) for name, items in self.registered.items() for i in items}
        wanted |= {
            (s.report.service, _authority(s.report.address, s.report.port))
            for s in book.instances.values()
            if s.report.address is not None
        }
        self.breakers = book.breaker_views(wanted)
        self.names = sorted(set(self.registered) | book.services())


def instances_of(views: Views, book: StatsBook, service: str, now: float) -> list[dict[str, Any]]:
    """The registry's live instances and the instances that report, merged: state is ``up``, ``ejected`` (a
    caller's breaker is open for it), ``silent`` (registered, but its reports stopped) or ``gone``."""
    registered = {i.id: i for i in views.registered.get(service, [])}
    reporters: dict[str, InstanceState] = {s.report.instance: s for s in views.reporters.get(service, [])}
    rows = []
    for instance_id in sorted(set(registered) | set(reporters)):
        entry = registered.get(instance_id)
        state = reporters.get(instance_id)
        report = state.report if state is not None else None
        address = entry.address if entry else (report.address if report else None)
        port = entry.port if entry else (report.port if report else None)
        if entry is None and (report is None or report.address is None):
            continue  # a client-only process (a script, a worker): counted as a caller, not an instance
        reporting = state is not None and book.status(state, now) == "reporting"
        views_of = views.breakers.get((service, _authority(str(address), port)), []) if address else []
        ejected_by = sorted({v["caller"] for v in views_of if v["state"] == "open"})
        if entry is None:
            health = "up" if reporting else "gone"
        elif state is not None and not reporting:
            health = "silent"
        else:
            health = "up"
        if ejected_by and health == "up":
            health = "ejected"
        rows.append(
            {
                "id": instance_id,
                "address": address,
                "port": port,
                "tags": entry.tags if entry else [],
                "tls": (entry.meta.get("mesh_tls") if entry else None) or (report.tls if report else None),
                "identity": report.identity if report else None,
                "registered": entry is not None,
                "reporting": reporting,
                "last_report_s_ago": round(now - state.last_seen, 1) if state is not None else None,
                "state": health,
                "breakers": views_of,
                "ejected_by": ejected_by,
                "rps": round(state.rps, 3) if state is not None and reporting else None,
                "rules_version": report.rules_version if report else None,
            }
        )
    return rows


def service_names(cp: ControlPlane, book: StatsBook) -> list[str]:
    return sorted(set(cp.registry.services()) | book.services())


def topology(cp: ControlPlane, book: StatsBook, now: float) -> dict[str, Any]:
    figures = book.service_figures(now)
    views = Views(cp, book)
    services = []
    for name in views.names:
        instances = instances_of(views, book, name, now)
        tls = sorted({str(i["tls"]) for i in instances if i["tls"]})
        services.append(
            {
                "name": name,
                "instances": len(instances),
                "instances_up": sum(1 for i in instances if i["state"] == "up"),
                "tls": tls,
                "callers_only": not instances,
                **(figures.get(name) or StatsBook.figures_empty()),
            }
        )
    return {"generated_at": now, "window_s": WINDOW, "services": services, "edges": book.edges(now)}


def service_detail(cp: ControlPlane, book: StatsBook, name: str, now: float) -> dict[str, Any]:
    return {
        "name": name,
        "generated_at": now,
        "window_s": WINDOW,
        "slot_s": SLOT_SECONDS,
        "instances": instances_of(Views(cp, book), book, name, now),
        "inbound": book.routes("in", name, now),
        "outbound": book.routes("out", name, now),
        "mirrored": book.routes("mirror", name, now),
        "counters": book.counters(name, now),
        "estimates": book.estimates(name),
        "timeline": {"inbound": book.timeline("in", name, now), "outbound": book.timeline("out", name, now)},
        **(book.service_figures(now).get(name) or StatsBook.figures_empty()),
    }


def stats_routes(cp: ControlPlane) -> list[Route]:
    book = cp.stats

    async def report(request: Request) -> Response:
        grant = cp.join_grant(request)
        if isinstance(grant, Response):
            return grant
        try:
            body = await read_body(request, MAX_REPORT_BYTES)
        except TooLarge:
            return too_large(MAX_REPORT_BYTES)
        try:
            # decoding and checking up to 256 KiB of rows is CPU work on untrusted input: off the event loop
            parsed = await asyncio.to_thread(_decode_report, body)
        except (ValueError, RecursionError) as exc:
            return error(400, f"invalid stats report: {exc}")
        refused = cp.out_of_scope(grant, parsed.service)
        if refused is not None:
            return refused
        held = cp.registry.get(parsed.instance)
        if held is not None and not cp.registry.owns(parsed.instance, request.headers.get(SECRET_HEADER)):
            # a registered instance's figures (its health, its breakers) come only from the instance itself
            return error(
                403, f"stats for registered instance {parsed.instance!r} need its {SECRET_HEADER}", reason="secret"
            )
        if not book.ingest(parsed):
            return error(
                503,
                f"stats: the book is full ({MAX_INSTANCES} instances or {MAX_BOOK_ROWS} rows); this report is not kept",
            )
        if parsed.refused:
            return JSONResponse({"refused": list(parsed.refused)})
        return Response(status_code=204)

    async def summary(request: Request) -> Response:
        return JSONResponse(
            {
                "reports": book.reports,
                "instances": len(book.instances),
                "series": len(book.series),
                "dropped_series": book.dropped_series,
                "limits": {
                    "instances": MAX_INSTANCES,
                    "series": MAX_SERIES,
                    "history_s": SLOTS * SLOT_SECONDS,
                    "forget_after_s": FORGET_AFTER,
                },
            }
        )

    #: The topology, serialised once a second at most: the dashboard polls it every 2 s from every open page.
    topology_cache: dict[str, tuple[float, bytes]] = {}

    async def get_topology(request: Request) -> Response:
        now = book.clock()
        cached = topology_cache.get("")
        if cached is None or now - cached[0] >= TOPOLOGY_TTL or now < cached[0]:
            cached = (now, json.dumps(topology(cp, book, now)).encode())
            topology_cache[""] = cached
        return Response(cached[1], media_type="application/json")

    async def get_service(request: Request) -> Response:
        name = request.path_params["name"]
        names = service_names(cp, book)
        if name not in names:
            close = difflib.get_close_matches(name, names, n=2)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            return error(404, f"no service {name[:64]!r} is registered or reporting{hint}")
        return JSONResponse(service_detail(cp, book, name, book.clock()))

    return [
        Route("/v1/stats/report", report, methods=["POST"]),
        Route("/v1/stats", summary, methods=["GET"]),
        Route("/v1/stats/topology", get_topology, methods=["GET"]),
        Route("/v1/stats/services/{name}", get_service, methods=["GET"]),
    ]
