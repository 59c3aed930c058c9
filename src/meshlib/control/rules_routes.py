"""``/v1/rules``: the whole document (what instances long-poll, and the old whole-document writes) and its
resources (``/v1/rules/services/{name}``, ``/v1/rules/defaults``), each versioned, diffed and rolled back on its
own, writable by an admin token scoped to that service."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import ConfigurationError
from ..rules.document import parse_document
from ..rules.model import Rules, RulesValidationError, validate_rules
from ..rules.review import diff
from .longpoll import hold
from .requests import MAX_QUERY_INT, BadQuery, TooLarge, error, int_param, read_body, too_large, wait_param
from .resources import DEFAULTS, content_of, parse_resource_name, service_of, version_map
from .rules_writes import Busy, ResourceConflict, TooBig, Written, resource_history, write_resources
from .store import CasConflict, UnknownVersion

if TYPE_CHECKING:
    from .app import ControlPlane
    from .tokens import Grant

log = logging.getLogger("meshlib.control")
#: Most resources one PATCH may change.
MAX_PATCHED = 1000


def _parse_and_validate(body: bytes, limit: int) -> Rules:
    return validate_rules(parse_document(body, "request body", max_bytes=limit))


def _invalid(exc: RulesValidationError | ConfigurationError) -> JSONResponse:
    errors = (
        [e.as_dict() for e in exc.errors]
        if isinstance(exc, RulesValidationError)
        else [{"path": "$", "error": str(exc)}]
    )
    return JSONResponse({"error": "invalid rules; nothing was stored", "errors": errors}, status_code=400)


def _wrapped(resource: str, content: Any) -> dict[str, Any]:
    """One resource as the document a team's file holds (``services: {payments: ...}``), for diffs."""
    if content is None:
        return {}
    service = service_of(resource)
    return {DEFAULTS: content} if service is None else {"services": {service: content}}


def rules_routes(cp: ControlPlane) -> list[Route]:
    def author_of(request: Request, grant: Grant | None) -> str:
        author = request.headers.get("x-mesh-author", "admin")[:256]
        return author if grant is None else f"{author} (token {grant.token_id})"

    def published(written: Written) -> None:
        if written.changed:
            cp.publish(written.revision)
            log.info("rules: version %d stored (%s)", written.revision.version, ", ".join(written.changed))

    async def write(
        request: Request, changes: dict[str, Any], expect: dict[str, int], grant: Grant | None, comment: str = ""
    ) -> Any:
        """The write carried out, or the refusal to send."""
        comment = request.headers.get("x-mesh-comment", "")[:1024] or comment
        try:
            written = await asyncio.to_thread(
                write_resources, cp.store, changes, expect, author_of(request, grant), comment, cp.max_rules_bytes
            )
        except ResourceConflict as exc:
            return error(409, str(exc), resource=exc.resource, version=exc.current)
        except RulesValidationError as exc:
            return _invalid(exc)
        except TooBig as exc:
            return error(413, f"{exc}; nothing was stored")
        except Busy as exc:
            return error(503, str(exc))
        published(written)
        return written

    def answer(written: Written) -> JSONResponse:
        versions = version_map(written.revision)
        return JSONResponse(
            {
                "version": written.revision.version,
                "changed": written.changed,
                "resources": {name: versions.get(name, 0) for name in written.changed},
                "warnings": [w.as_dict() for w in written.rules.warnings],
            },
            headers={"x-mesh-index": str(written.revision.version)},
        )

    # -- the whole document -----------------------------------------------------------------------

    async def get_rules(request: Request) -> Response:
        try:
            index = int_param(request, "index")
            wait = wait_param(request)
        except BadQuery as exc:
            return error(400, str(exc))
        if index is not None and cp.revision.version <= index:
            await hold(cp.rules_signal, wait, lambda: cp.revision.version > index or cp.closing, request.receive)
        return Response(
            cp.rules_body, media_type="application/json", headers={"x-mesh-index": str(cp.revision.version)}
        )

    async def put_rules(request: Request) -> Response:
        denied = cp.check_admin(request)
        if denied is not None:
            return denied
        try:
            cas = int_param(request, "cas")
        except BadQuery as exc:
            return error(400, str(exc))
        try:
            body = await read_body(request, cp.max_rules_bytes)
        except TooLarge:
            return too_large(cp.max_rules_bytes)
        try:
            # parsing and validation are CPU work on untrusted input: off the event loop, so long-polls and
            # /healthz keep being answered while they run
            rules = await asyncio.to_thread(_parse_and_validate, body, cp.max_rules_bytes)
        except (RulesValidationError, ConfigurationError) as exc:
            return _invalid(exc)
        comment = request.headers.get("x-mesh-comment", "")[:1024]
        try:
            revision = await asyncio.to_thread(
                cp.store.put, dict(rules.document), cas, request.headers.get("x-mesh-author", "admin")[:256], comment
            )
        except CasConflict as exc:
            return error(409, str(exc), version=exc.current)
        cp.publish(revision)
        log.info("rules: version %d stored", revision.version)
        return JSONResponse(
            {"version": revision.version, "warnings": [w.as_dict() for w in rules.warnings]},
            headers={"x-mesh-index": str(revision.version)},
        )

    async def patch_rules(request: Request) -> Response:
        """``{"resources": {"services/payments": {...} | null, "defaults": ...}, "expect": {name: version}}``:
        those resources replaced (null: removed) in one version, the others untouched."""
        try:
            raw = await read_body(request, cp.max_rules_bytes)
            body = await asyncio.to_thread(parse_document, raw, "request body", max_bytes=cp.max_rules_bytes)
        except TooLarge:
            return too_large(cp.max_rules_bytes)
        except ConfigurationError as exc:
            return error(400, str(exc))
        try:
            changes, expect = _patch(body)
        except ValueError as exc:
            return error(400, f"cannot change the rules: {exc}")
        grant, denied = cp.admin_grant(request, changes)
        if denied is not None:
            return denied
        result = await write(request, changes, expect, grant)
        return result if isinstance(result, Response) else answer(result)

    async def history(request: Request) -> Response:
        try:
            limit = min(int_param(request, "limit", 100) or 100, 1000)
        except BadQuery as exc:
            return error(400, str(exc))
        revisions = await asyncio.to_thread(cp.store.history, limit)
        return JSONResponse({"current": cp.revision.version, "versions": [r.summary() for r in revisions]})

    async def get_version(request: Request) -> Response:
        raw = request.path_params["version"]
        if not raw.isdigit() or len(raw) > 19 or int(raw) > MAX_QUERY_INT:
            return error(404, f"no rules version {raw[:40]!r}: versions are whole numbers")
        try:
            revision = await asyncio.to_thread(cp.store.get, int(raw))
        except UnknownVersion:
            return error(404, f"no rules version {raw}")
        return JSONResponse({"version": revision.version, "rules": revision.document, **revision.summary()})

    async def rollback(request: Request) -> Response:
        denied = cp.check_admin(request)
        if denied is not None:
            return denied
        try:
            target = int_param(request, "to")
        except BadQuery as exc:
            return error(400, str(exc))
        if target is None:
            return error(400, "query parameter to=<version> is required")
        try:
            old = await asyncio.to_thread(cp.store.get, target)
        except UnknownVersion:
            return error(404, f"no rules version {target}")
        revision = await asyncio.to_thread(
            cp.store.put, old.document, None, request.headers.get("x-mesh-author", "admin"), f"rollback to {target}"
        )
        cp.publish(revision)
        return JSONResponse({"version": revision.version, "rolled_back_to": target})

    async def resource_versions(request: Request) -> Response:
        revision = cp.revision
        return JSONResponse(
            {"version": revision.version, "resources": dict(version_map(revision)), "rules": revision.document}
        )

    # -- one resource -----------------------------------------------------------------------------

    def resource_or_refusal(request: Request) -> str | Response:
        name = request.path_params.get("name")
        if name is None:
            return DEFAULTS
        try:
            return parse_resource_name(str(name))
        except ValueError as exc:
            return error(404, str(exc))

    async def get_resource(request: Request) -> Response:
        resource = resource_or_refusal(request)
        if isinstance(resource, Response):
            return resource
        revision = cp.revision
        return JSONResponse(
            {
                "resource": resource,
                "version": version_map(revision).get(resource, 0),
                "rules": content_of(revision.document, resource),
                "rules_version": revision.version,
            }
        )

    async def put_resource(request: Request) -> Response:
        resource = resource_or_refusal(request)
        if isinstance(resource, Response):
            return resource
        grant, denied = cp.admin_grant(request, [resource])
        if denied is not None:
            return denied
        try:
            cas = int_param(request, "cas")
            raw = await read_body(request, cp.max_rules_bytes)
            content = await asyncio.to_thread(parse_document, raw, "request body", max_bytes=cp.max_rules_bytes)
        except BadQuery as exc:
            return error(400, str(exc))
        except TooLarge:
            return too_large(cp.max_rules_bytes)
        except ConfigurationError as exc:
            return error(400, str(exc))
        if not isinstance(content, Mapping):
            return error(400, f"expected {resource}'s rules as a mapping (to remove them, send DELETE)")
        result = await write(request, {resource: dict(content)}, {} if cas is None else {resource: cas}, grant)
        return result if isinstance(result, Response) else answer(result)

    async def delete_resource(request: Request) -> Response:
        resource = resource_or_refusal(request)
        if isinstance(resource, Response):
            return resource
        grant, denied = cp.admin_grant(request, [resource])
        if denied is not None:
            return denied
        try:
            cas = int_param(request, "cas")
        except BadQuery as exc:
            return error(400, str(exc))
        result = await write(request, {resource: None}, {} if cas is None else {resource: cas}, grant)
        return result if isinstance(result, Response) else answer(result)

    async def get_resource_history(request: Request) -> Response:
        resource = resource_or_refusal(request)
        if isinstance(resource, Response):
            return resource
        try:
            limit = min(int_param(request, "limit", 100) or 100, 1000)
        except BadQuery as exc:
            return error(400, str(exc))
        changes = await asyncio.to_thread(resource_history, cp.store, resource, limit)
        return JSONResponse(
            {
                "resource": resource,
                "current": version_map(cp.revision).get(resource, 0),
                "versions": [{**c.revision.summary(), "action": c.action} for c in changes],
            }
        )

    async def get_resource_diff(request: Request) -> Response:
        """``?from=A&to=B`` (whole-document versions; default: the resource's last change)."""
        resource = resource_or_refusal(request)
        if isinstance(resource, Response):
            return resource
        try:
            a = int_param(request, "from")
            b = int_param(request, "to")
        except BadQuery as exc:
            return error(400, str(exc))
        b = cp.revision.version if b is None else b
        try:
            new = await asyncio.to_thread(cp.store.get, b)
            if a is None:
                a = max(version_map(new).get(resource, 0) - 1, 0)
            old = await asyncio.to_thread(cp.store.get, a)
        except UnknownVersion as exc:
            return error(404, f"no rules version {exc}")
        lines = diff(
            _wrapped(resource, content_of(old.document, resource)),
            _wrapped(resource, content_of(new.document, resource)),
            a,
            f"version {b}",
        )
        return JSONResponse({"resource": resource, "from": a, "to": b, "diff": "\n".join(lines)})

    async def rollback_resource(request: Request) -> Response:
        """``?to=V``: the resource as it was at whole-document version V, as a new version (other resources
        untouched); ``cas`` as for a write."""
        resource = resource_or_refusal(request)
        if isinstance(resource, Response):
            return resource
        grant, denied = cp.admin_grant(request, [resource])
        if denied is not None:
            return denied
        try:
            target = int_param(request, "to")
            cas = int_param(request, "cas")
        except BadQuery as exc:
            return error(400, str(exc))
        if target is None:
            return error(400, "query parameter to=<version> is required")
        try:
            old = await asyncio.to_thread(cp.store.get, target)
        except UnknownVersion:
            return error(404, f"no rules version {target}")
        result = await write(
            request,
            {resource: content_of(old.document, resource)},
            {} if cas is None else {resource: cas},
            grant,
            f"rollback of {resource} to version {target}",
        )
        return result if isinstance(result, Response) else answer(result)

    one = ("/v1/rules/services/{name}", "/v1/rules/defaults")
    return [
        Route("/v1/rules", get_rules, methods=["GET"]),
        Route("/v1/rules", put_rules, methods=["PUT"]),
        Route("/v1/rules", patch_rules, methods=["PATCH"]),
        Route("/v1/rules/history", history, methods=["GET"]),
        Route("/v1/rules/rollback", rollback, methods=["POST"]),
        Route("/v1/rules/resources", resource_versions, methods=["GET"]),
        *[
            route
            for path in one
            for route in (
                Route(path, get_resource, methods=["GET"]),
                Route(path, put_resource, methods=["PUT"]),
                Route(path, delete_resource, methods=["DELETE"]),
                Route(path + "/history", get_resource_history, methods=["GET"]),
                Route(path + "/diff", get_resource_diff, methods=["GET"]),
                Route(path + "/rollback", rollback_resource, methods=["POST"]),
            )
        ],
        Route("/v1/rules/{version}", get_version, methods=["GET"]),
    ]


def _patch(body: Any) -> tuple[dict[str, Any], dict[str, int]]:
    """The resources to change and the versions expected, validated (names, shapes, counts)."""
    if not isinstance(body, Mapping) or set(body) - {"resources", "expect"}:
        raise ValueError('expected {"resources": {NAME: rules or null}, "expect": {NAME: version}}')
    resources = body.get("resources")
    expect = body.get("expect") or {}
    if not isinstance(resources, Mapping) or not resources or len(resources) > MAX_PATCHED:
        raise ValueError(f"resources: expected 1 to {MAX_PATCHED} resources (services/NAME or defaults)")
    if not isinstance(expect, Mapping):
        raise ValueError("expect: expected a mapping of resource names to versions")
    changes: dict[str, Any] = {}
    for name, content in resources.items():
        if content is not None and not isinstance(content, Mapping):
            raise ValueError(f"resources.{str(name)[:80]}: expected a mapping of rules, or null to remove them")
        changes[parse_resource_name(str(name))] = None if content is None else dict(content)
    wanted: dict[str, int] = {}
    for name, version in expect.items():
        if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= MAX_QUERY_INT:
            raise ValueError(f"expect.{str(name)[:80]}: expected a version (a whole number)")
        resource = parse_resource_name(str(name))
        if resource not in changes:
            raise ValueError(f"expect.{resource}: not among the resources changed")
        wanted[resource] = version
    return changes, wanted
