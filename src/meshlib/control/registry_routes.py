"""The embedded registry's HTTP API: registration with per-instance secrets, heartbeats, and the per-service and
multiplexed long-poll watches."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import ConfigurationError
from ..settings import validate_service_name
from ..wire import SECRET_HEADER
from .longpoll import hold
from .registry import NotOwner, RegistrationError, parse_registration
from .registry_writes import RegistryBusy
from .requests import SMALL_BODY_BYTES, BadQuery, TooLarge, error, int_param, read_body, too_large, wait_param

if TYPE_CHECKING:
    from .app import ControlPlane

#: Most services one multiplexed watch may name, and all waiting watches together (about 100 bytes a name held):
#: unauthenticated watches naming never-registered services cannot hold gigabytes.
MAX_WATCHED = 4096
MAX_WATCHED_TOTAL = 250_000


def registry_routes(cp: ControlPlane) -> list[Route]:
    async def register(request: Request) -> Response:
        grant = cp.join_grant(request)
        if isinstance(grant, Response):
            return grant
        try:
            raw = await read_body(request, SMALL_BODY_BYTES)
            instance = parse_registration(json.loads(raw or b"null"), cp.allow_unsafe_addresses)
        except TooLarge:
            return too_large(SMALL_BODY_BYTES)
        except (RegistrationError, ValueError, RecursionError) as exc:
            return error(400, f"invalid registration: {exc}")
        refused = cp.out_of_scope(grant, instance.service)
        if refused is not None:
            return refused
        try:
            secret = await cp.registry_writes.register(instance, request.headers.get(SECRET_HEADER))
        except RegistryBusy as exc:
            return error(503, str(exc), reason="store")
        except NotOwner:
            return error(
                409,
                f"instance id {instance.id!r} is registered by another holder: overwriting it needs its "
                f"{SECRET_HEADER} header (or register under another id)",
            )
        return JSONResponse({"id": instance.id, "ttl": instance.ttl, "secret": secret})

    def owned(
        action: Callable[[str, str | None], Awaitable[bool]], unknown: str
    ) -> Callable[[Request], Awaitable[Response]]:
        """A write to one instance's entry: a token that may act as its service, then the instance's own secret."""

        async def endpoint(request: Request) -> Response:
            grant = cp.join_grant(request)
            if isinstance(grant, Response):
                return grant
            instance_id = request.path_params["id"]
            held = cp.registry.get(instance_id)
            if held is not None:
                refused = cp.out_of_scope(grant, held.service)
                if refused is not None:
                    return refused
            try:
                known = await action(instance_id, request.headers.get(SECRET_HEADER))
            except RegistryBusy as exc:
                return error(503, str(exc), reason="store")
            except NotOwner:
                return error(403, f"instance {instance_id[:200]!r}: {SECRET_HEADER} missing or wrong")
            if not known:
                return error(404, f"unknown instance {instance_id[:200]!r}{unknown}")
            return JSONResponse({"ok": True})

        return endpoint

    heartbeat = owned(cp.registry_writes.heartbeat, ": register again")
    deregister = owned(cp.registry_writes.deregister, "")

    async def watch_service(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            validate_service_name(name)
        except ConfigurationError as exc:
            return error(400, str(exc))
        try:
            index = int_param(request, "index")
            wait = wait_param(request)
        except BadQuery as exc:
            return error(400, str(exc))
        registry = cp.registry
        if index is not None and registry.service_index(name) <= index:
            await hold(
                registry.signal, wait, lambda: registry.service_index(name) > index or cp.closing, request.receive
            )
        current, body = registry.encoded(name)
        return Response(body, media_type="application/json", headers={"x-mesh-index": str(current)})

    async def watch_many(request: Request) -> Response:
        """One long-poll for many services (xDS's aggregated stream, over HTTP): answers with the watched services
        that changed after ``index``, as soon as one does, or with none when ``wait`` passes. Names come in the
        query (``services=a,b``) or, for long lists, as a JSON body ``{"services": [...]}`` on POST."""
        try:
            index = int_param(request, "index") or 0
            wait = wait_param(request)
            if request.method == "POST":
                body = json.loads(await read_body(request, SMALL_BODY_BYTES * 16) or b"{}")
                raw = body.get("services") if isinstance(body, dict) else None
                if not isinstance(raw, list) or not all(isinstance(n, str) for n in raw):
                    raise BadQuery('body: expected {"services": [names]}')
                names = raw
            else:
                names = [n for n in request.query_params.get("services", "").split(",") if n]
            if len(names) > MAX_WATCHED:
                raise BadQuery(f"at most {MAX_WATCHED} services per watch")
            for name in names:
                validate_service_name(name)
        except TooLarge:
            return too_large(SMALL_BODY_BYTES * 16)
        except (BadQuery, ConfigurationError, ValueError, RecursionError) as exc:
            return error(400, str(exc))
        names = sorted(set(names))
        session = request.query_params.get("session", "")[:64]
        registry = cp.registry
        if index and not registry.changed_since(names, index):
            if cp.watched_names + len(names) > MAX_WATCHED_TOTAL:
                return error(
                    503,
                    f"the control plane holds {MAX_WATCHED_TOTAL} watched names already; retry later",
                    reason="watches",
                )
            check = registry.watch(frozenset(names), index)
            woken = cp.wakers.register(session) if session else None
            cp.watched_names += len(names)
            try:
                await hold(registry.signal, wait, lambda: check() or cp.closing, request.receive, woken)
            finally:
                cp.watched_names -= len(names)
                if woken is not None:
                    cp.wakers.done(session, woken)
        changed = registry.changed_since(names, index)
        return Response(
            registry.encoded_many(changed), media_type="application/json", headers={"x-mesh-index": str(registry.index)}
        )

    async def wake_watch(request: Request) -> Response:
        session = request.query_params.get("session", "")
        if not session or len(session) > 64:
            return error(400, "query parameter session=<the watch's session id> is required (at most 64 characters)")
        return JSONResponse({"woken": cp.wakers.wake(session)})

    async def list_services(request: Request) -> Response:
        services = cp.registry.services()
        return JSONResponse(
            {
                "index": cp.registry.index,
                "services": {name: [i.public() for i in items] for name, items in sorted(services.items())},
            }
        )

    return [
        Route("/v1/registry/register", register, methods=["PUT"]),
        Route("/v1/registry/heartbeat/{id}", heartbeat, methods=["PUT"]),
        Route("/v1/registry/services", list_services, methods=["GET"]),
        Route("/v1/registry/watch", watch_many, methods=["GET", "POST"]),
        Route("/v1/registry/watch/wake", wake_watch, methods=["POST"]),
        Route("/v1/registry/services/{name}", watch_service, methods=["GET"]),
        Route("/v1/registry/{id}", deregister, methods=["DELETE"]),
    ]
