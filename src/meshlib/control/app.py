"""The config service's HTTP API (design §6) as a Starlette app."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..errors import ConfigurationError
from ..rules.document import MAX_DOCUMENT_BYTES, parse_document
from ..rules.model import Rules, RulesValidationError, parse_duration, validate_rules
from ..security.ca import DEFAULT_LEAF_LIFETIME, CertificateAuthority, CsrError
from ..settings import validate_service_name
from ..wire import SECRET_HEADER
from .longpoll import MAX_WAIT, ChangeSignal, Wakers, hold
from .registry import NotOwner, RegistrationError, Registry, parse_registration
from .store import CasConflict, Revision, RulesStore, UnknownVersion

log = logging.getLogger("meshlib.control")
DEFAULT_WAIT = 30.0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


class _BadQuery(ValueError):
    pass


class _TooLarge(Exception):
    pass


#: Registration and CSR bodies are small; anything larger is refused before it is read whole.
SMALL_BODY_BYTES = 64 * 1024
#: Most services one multiplexed watch may name.
MAX_WATCHED = 10_000
#: Largest integer accepted in a query parameter (versions, indexes): SQLite's integers are 64-bit.
MAX_QUERY_INT = 2**62


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, or _TooLarge as soon as it is known to exceed ``limit`` (by Content-Length, or while
    streaming): an oversized body is never held in memory whole."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or len(declared) > 18 or int(declared) > limit):
        raise _TooLarge(declared)
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge(str(size))
        parts.append(chunk)
    return b"".join(parts)


def _too_large(limit: int) -> JSONResponse:
    """413, and the connection is closed after it: the rest of the body is never read."""
    response = _error(413, f"request body is larger than the limit of {limit} bytes", limit=limit)
    response.headers["connection"] = "close"
    return response


def _int_param(request: Request, name: str, default: int | None = None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if len(raw) > 19 or not raw.isdigit():
        raise _BadQuery(f"query parameter {name}={raw[:40]!r} is not a non-negative integer")
    value = int(raw)
    if value > MAX_QUERY_INT:
        raise _BadQuery(f"query parameter {name} must be at most {MAX_QUERY_INT}")
    return value


def _parse_and_validate(body: bytes, limit: int) -> Rules:
    return validate_rules(parse_document(body, "request body", max_bytes=limit))


def _wait_param(request: Request) -> float:
    raw = request.query_params.get("wait")
    if raw is None:
        return DEFAULT_WAIT
    try:
        return parse_duration(raw if raw[-1:].isalpha() else float(raw), maximum=MAX_WAIT)
    except ValueError as exc:
        raise _BadQuery(f"query parameter wait={raw[:40]!r}: {exc}") from None


class ControlPlane:
    """State of one config service: the rules store with the current version served from memory, the registry,
    and the change signals long-polls wait on."""

    def __init__(
        self,
        store: RulesStore,
        *,
        admin_token: str | None = None,
        registry_token: str | None = None,
        expiry_interval: float = 0.2,
        ca: CertificateAuthority | None = None,
        max_rules_bytes: int = MAX_DOCUMENT_BYTES,
        allow_unsafe_addresses: bool = False,
    ) -> None:
        self.store = store
        self.ca = ca
        self.admin_token = admin_token or None
        self.registry_token = registry_token or None
        self.registry = Registry()
        self.wakers = Wakers()
        self.rules_signal = ChangeSignal()
        self.expiry_interval = expiry_interval
        self.max_rules_bytes = max_rules_bytes
        self.allow_unsafe_addresses = allow_unsafe_addresses
        self.closing = False
        self._set_current(store.current())

    def _set_current(self, revision: Revision) -> None:
        self.revision = revision
        self.rules_body = json.dumps({"version": revision.version, "rules": revision.document}).encode()

    def publish(self, revision: Revision) -> None:
        if revision.version > self.revision.version:
            self._set_current(revision)
            self.rules_signal.fire()

    def release_waiters(self) -> None:
        """On shutdown: answer every long-poll now (with what is current) instead of holding the exit up."""
        self.closing = True
        self.rules_signal.fire()
        self.registry.signal.fire()

    async def expiry_loop(self) -> None:
        while True:
            await asyncio.sleep(self.expiry_interval)
            for instance_id in self.registry.expire():
                log.info("registry: %s expired (no heartbeat within its TTL)", instance_id)

    # -- auth -------------------------------------------------------------------------------------

    @staticmethod
    def _bearer(request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

    def check_admin(self, request: Request) -> Response | None:
        if self.admin_token is None:
            return _error(403, "admin writes are disabled: start the control plane with MESH_ADMIN_TOKEN set")
        token = self._bearer(request)
        if token is None or not hmac.compare_digest(token.encode(), self.admin_token.encode()):
            return _error(401, "admin token required: send Authorization: Bearer <MESH_ADMIN_TOKEN>")
        return None

    def check_registry(self, request: Request) -> Response | None:
        if self.registry_token is None:
            # no token: only processes on this machine may write (the port may still be reachable from others)
            client = request.client
            if client is not None and _is_loopback(client.host):
                return None
            return _error(
                403,
                "registry writes from other machines need a token: start the control plane with "
                "MESH_BOOTSTRAP_TOKEN set, and set the same MESH_BOOTSTRAP_TOKEN on every instance",
            )
        token = self._bearer(request)
        if token is None or not hmac.compare_digest(token.encode(), self.registry_token.encode()):
            return _error(401, "registry token required: send Authorization: Bearer <MESH_BOOTSTRAP_TOKEN>")
        return None


def build_app(cp: ControlPlane) -> Starlette:

    async def get_rules(request: Request) -> Response:
        try:
            index = _int_param(request, "index")
            wait = _wait_param(request)
        except _BadQuery as exc:
            return _error(400, str(exc))
        if index is not None and cp.revision.version <= index:
            await hold(cp.rules_signal, wait, lambda: cp.revision.version > index or cp.closing, request.receive)
        return Response(
            cp.rules_body,
            media_type="application/json",
            headers={"x-mesh-index": str(cp.revision.version)},
        )

    async def put_rules(request: Request) -> Response:
        denied = cp.check_admin(request)
        if denied is not None:
            return denied
        try:
            cas = _int_param(request, "cas")
        except _BadQuery as exc:
            return _error(400, str(exc))
        try:
            body = await _read_body(request, cp.max_rules_bytes)
        except _TooLarge:
            return _too_large(cp.max_rules_bytes)
        try:
            # parsing and validation are CPU work on untrusted input: off the event loop, so long-polls and
            # /healthz keep being answered while they run
            rules = await asyncio.to_thread(_parse_and_validate, body, cp.max_rules_bytes)
        except RulesValidationError as exc:
            return JSONResponse(
                {"error": "invalid rules; nothing was stored", "errors": [e.as_dict() for e in exc.errors]},
                status_code=400,
            )
        except ConfigurationError as exc:
            return JSONResponse(
                {"error": "invalid rules; nothing was stored", "errors": [{"path": "$", "error": str(exc)}]},
                status_code=400,
            )
        comment = request.headers.get("x-mesh-comment", "")[:1024]
        try:
            revision = await asyncio.to_thread(
                cp.store.put, dict(rules.document), cas, request.headers.get("x-mesh-author", "admin")[:256], comment
            )
        except CasConflict as exc:
            return _error(409, str(exc), version=exc.current)
        cp.publish(revision)
        log.info("rules: version %d stored", revision.version)
        return JSONResponse({"version": revision.version}, headers={"x-mesh-index": str(revision.version)})

    async def history(request: Request) -> Response:
        try:
            limit = _int_param(request, "limit", 100) or 100
        except _BadQuery as exc:
            return _error(400, str(exc))
        limit = min(limit, 1000)
        revisions = await asyncio.to_thread(cp.store.history, limit)
        return JSONResponse({"current": cp.revision.version, "versions": [r.summary() for r in revisions]})

    async def get_version(request: Request) -> Response:
        raw = request.path_params["version"]
        if not raw.isdigit() or len(raw) > 19 or int(raw) > MAX_QUERY_INT:
            return _error(404, f"no rules version {raw[:40]!r}: versions are whole numbers")
        try:
            revision = await asyncio.to_thread(cp.store.get, int(raw))
        except UnknownVersion:
            return _error(404, f"no rules version {raw}")
        return JSONResponse({"version": revision.version, "rules": revision.document, **revision.summary()})

    async def rollback(request: Request) -> Response:
        denied = cp.check_admin(request)
        if denied is not None:
            return denied
        try:
            target = _int_param(request, "to")
        except _BadQuery as exc:
            return _error(400, str(exc))
        if target is None:
            return _error(400, "query parameter to=<version> is required")
        try:
            old = await asyncio.to_thread(cp.store.get, target)
        except UnknownVersion:
            return _error(404, f"no rules version {target}")
        revision = await asyncio.to_thread(
            cp.store.put, old.document, None, request.headers.get("x-mesh-author", "admin"), f"rollback to {target}"
        )
        cp.publish(revision)
        return JSONResponse({"version": revision.version, "rolled_back_to": target})

    async def register(request: Request) -> Response:
        denied = cp.check_registry(request)
        if denied is not None:
            return denied
        try:
            raw = await _read_body(request, SMALL_BODY_BYTES)
            instance = parse_registration(json.loads(raw or b"null"), cp.allow_unsafe_addresses)
        except _TooLarge:
            return _too_large(SMALL_BODY_BYTES)
        except (RegistrationError, ValueError, RecursionError) as exc:
            return _error(400, f"invalid registration: {exc}")
        try:
            cp.registry.register(instance, request.headers.get(SECRET_HEADER))
        except NotOwner:
            return _error(
                409,
                f"instance id {instance.id!r} is registered by another holder: overwriting it needs its "
                f"{SECRET_HEADER} header (or register under another id)",
            )
        return JSONResponse({"id": instance.id, "ttl": instance.ttl, "secret": instance.secret})

    async def heartbeat(request: Request) -> Response:
        denied = cp.check_registry(request)
        if denied is not None:
            return denied
        instance_id = request.path_params["id"]
        try:
            known = cp.registry.heartbeat(instance_id, request.headers.get(SECRET_HEADER))
        except NotOwner:
            return _error(403, f"instance {instance_id[:200]!r}: {SECRET_HEADER} missing or wrong")
        if not known:
            return _error(404, f"unknown instance {instance_id[:200]!r}: register again")
        return JSONResponse({"ok": True})

    async def deregister(request: Request) -> Response:
        denied = cp.check_registry(request)
        if denied is not None:
            return denied
        instance_id = request.path_params["id"]
        try:
            known = cp.registry.deregister(instance_id, request.headers.get(SECRET_HEADER))
        except NotOwner:
            return _error(403, f"instance {instance_id[:200]!r}: {SECRET_HEADER} missing or wrong")
        if not known:
            return _error(404, f"unknown instance {instance_id[:200]!r}")
        return JSONResponse({"ok": True})

    async def watch_service(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            validate_service_name(name)
        except ConfigurationError as exc:
            return _error(400, str(exc))
        try:
            index = _int_param(request, "index")
            wait = _wait_param(request)
        except _BadQuery as exc:
            return _error(400, str(exc))
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
            index = _int_param(request, "index") or 0
            wait = _wait_param(request)
            if request.method == "POST":
                body = json.loads(await _read_body(request, SMALL_BODY_BYTES * 16) or b"{}")
                raw = body.get("services") if isinstance(body, dict) else None
                if not isinstance(raw, list) or not all(isinstance(n, str) for n in raw):
                    raise _BadQuery("body: expected {\"services\": [names]}")
                names = raw
            else:
                names = [n for n in request.query_params.get("services", "").split(",") if n]
            if len(names) > MAX_WATCHED:
                raise _BadQuery(f"at most {MAX_WATCHED} services per watch")
            for name in names:
                validate_service_name(name)
        except _TooLarge:
            return _too_large(SMALL_BODY_BYTES * 16)
        except (_BadQuery, ConfigurationError, ValueError, RecursionError) as exc:
            return _error(400, str(exc))
        names = sorted(set(names))
        session = request.query_params.get("session", "")[:64]
        registry = cp.registry
        if index and not registry.changed_since(names, index):
            woken = cp.wakers.register(session) if session else None
            try:
                await hold(registry.signal, wait, lambda: bool(registry.changed_since(names, index)) or cp.closing,
                           request.receive, woken)
            finally:
                if woken is not None:
                    cp.wakers.done(session, woken)
        changed = registry.changed_since(names, index)
        return Response(registry.encoded_many(changed), media_type="application/json",
                        headers={"x-mesh-index": str(registry.index)})

    async def wake_watch(request: Request) -> Response:
        session = request.query_params.get("session", "")
        if not session or len(session) > 64:
            return _error(400, "query parameter session=<the watch's session id> is required (at most 64 characters)")
        return JSONResponse({"woken": cp.wakers.wake(session)})

    async def list_services(request: Request) -> Response:
        services = cp.registry.services()
        return JSONResponse(
            {
                "index": cp.registry.index,
                "services": {name: [i.public() for i in items] for name, items in sorted(services.items())},
            }
        )

    async def ca_sign(request: Request) -> Response:
        if cp.ca is None:
            return _error(
                503, "this control plane has no CA: run meshctl ca init (or start it with --ca-cert/--ca-key)"
            )
        if cp.registry_token is None:
            return _error(403, "certificate issuing is disabled: start the control plane with MESH_BOOTSTRAP_TOKEN set")
        denied = cp.check_registry(request)
        if denied is not None:
            return denied
        try:
            body = json.loads(await _read_body(request, SMALL_BODY_BYTES) or b"null")
            if not isinstance(body, dict) or not isinstance(body.get("csr"), str):
                raise ValueError("expected a JSON object with csr (PEM) and service")
            service = body.get("service")
            namespace = body.get("namespace", "default")
            if not isinstance(service, str) or not isinstance(namespace, str):
                raise ValueError("service and namespace must be strings")
            lifetime = float(body.get("lifetime_seconds", DEFAULT_LEAF_LIFETIME.total_seconds()))
            if not 2 <= lifetime <= 7 * 86400:
                raise ValueError("lifetime_seconds must be between 2 and 604800")
            issued = cp.ca.sign_csr(body["csr"].encode(), service, namespace, timedelta(seconds=lifetime))
        except _TooLarge:
            return _too_large(SMALL_BODY_BYTES)
        except (ValueError, TypeError, OverflowError, RecursionError, CsrError) as exc:
            return _error(400, f"cannot issue: {exc}")
        return JSONResponse(
            {
                "certificate": issued.pem().decode(),
                "chain": [c.public_bytes(Encoding.PEM).decode() for c in issued.chain],
                "expires_at": issued.certificate.not_valid_after_utc.timestamp(),
                "spiffe_id": f"spiffe://{cp.ca.trust_domain}/ns/{namespace}/sa/{service}",
            }
        )

    async def ca_roots(request: Request) -> Response:
        if cp.ca is None:
            return _error(503, "this control plane has no CA")
        return JSONResponse(
            {"trust_domain": cp.ca.trust_domain, "roots": [c.public_bytes(Encoding.PEM).decode() for c in cp.ca.roots]}
        )

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "rules_version": cp.revision.version})

    async def metrics(request: Request) -> Response:
        services = cp.registry.services()
        lines = [
            "# HELP meshcp_rules_version Current rules version.",
            "# TYPE meshcp_rules_version gauge",
            f"meshcp_rules_version {cp.revision.version}",
            "# HELP meshcp_rules_watchers Long-polls waiting for a rules change.",
            "# TYPE meshcp_rules_watchers gauge",
            f"meshcp_rules_watchers {cp.rules_signal.waiters}",
            "# HELP meshcp_registry_watchers Long-polls waiting for a registry change.",
            "# TYPE meshcp_registry_watchers gauge",
            f"meshcp_registry_watchers {cp.registry.signal.waiters}",
            "# HELP meshcp_registry_instances Registered, live instances per service.",
            "# TYPE meshcp_registry_instances gauge",
        ]
        lines += [f'meshcp_registry_instances{{service="{name}"}} {len(items)}' for name, items in services.items()]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(cp.expiry_loop())
        watch = getattr(cp.store, "watch", None)
        if watch is not None:  # a shared store: changes written by other config services reach our watchers too
            loop = asyncio.get_running_loop()
            watch(lambda revision: loop.call_soon_threadsafe(cp.publish, revision))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return Starlette(
        routes=[
            Route("/v1/rules", get_rules, methods=["GET"]),
            Route("/v1/rules", put_rules, methods=["PUT"]),
            Route("/v1/rules/history", history, methods=["GET"]),
            Route("/v1/rules/rollback", rollback, methods=["POST"]),
            Route("/v1/rules/{version}", get_version, methods=["GET"]),
            Route("/v1/registry/register", register, methods=["PUT"]),
            Route("/v1/registry/heartbeat/{id}", heartbeat, methods=["PUT"]),
            Route("/v1/registry/services", list_services, methods=["GET"]),
            Route("/v1/registry/watch", watch_many, methods=["GET", "POST"]),
            Route("/v1/registry/watch/wake", wake_watch, methods=["POST"]),
            Route("/v1/registry/services/{name}", watch_service, methods=["GET"]),
            Route("/v1/registry/{id}", deregister, methods=["DELETE"]),
            Route("/v1/ca/sign", ca_sign, methods=["POST"]),
            Route("/v1/ca/roots", ca_roots, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
