"""The config service's HTTP API (design §6) as a Starlette app."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.serialization import Encoding
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..rules.document import MAX_DOCUMENT_BYTES
from ..security.ca import DEFAULT_LEAF_LIFETIME, CertificateAuthority, CsrError
from .hosts import HostGuard
from .longpoll import ChangeSignal, Wakers
from .prometheus_routes import prometheus_routes
from .registry import Registry
from .registry_routes import registry_routes
from .registry_writes import LocalRegistryWrites, RegistryBusy, RegistryWrites
from .requests import (
    SMALL_BODY_BYTES,
    TooLarge,
    error,
    is_loopback,
    read_body,
    too_large,
)
from .resources import SERVICE_PREFIX, service_of
from .rules_routes import rules_routes
from .stats import StatsBook
from .stats_report import Report
from .stats_routes import stats_routes
from .store import Revision, RulesStore
from .token_routes import token_routes
from .tokens import ADMIN, ANY_SERVICE, JOIN, Grant, TokenStore
from .ui import CsrfGuard, new_csrf_token, ui_routes
from .xds_routes import xds_routes

if TYPE_CHECKING:
    from .xds_server import XdsServer

log = logging.getLogger("meshlib.control")


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
        tokens: TokenStore | None = None,
        allowed_hosts: frozenset[str] | None = None,
        registry_writes: Callable[[Registry], RegistryWrites] | None = None,
    ) -> None:
        #: Host names served (None: any); see ``hosts.HostGuard``.
        self.allowed_hosts = allowed_hosts
        self.store = store
        #: Join tokens scoped to services (None: only the shared token, or loopback writes, are accepted).
        self.tokens = tokens
        self.ca = ca
        self.admin_token = admin_token or None
        self.registry_token = registry_token or None
        self.registry = Registry()
        #: Where registry writes go: this registry (the default), or a store shared by replicas.
        self.registry_writes: RegistryWrites = (registry_writes or LocalRegistryWrites)(self.registry)
        #: Shared state this replica follows (``follow(publish)`` each, started with the app): the registry's
        #: records and the tokens, when they live in Consul.
        self.followers: list[Any] = []
        self.wakers = Wakers()
        self.rules_signal = ChangeSignal()
        self.expiry_interval = expiry_interval
        self.max_rules_bytes = max_rules_bytes
        self.allow_unsafe_addresses = allow_unsafe_addresses
        self.closing = False
        #: Names held by waiting multiplexed watches, all together (bounded: see registry_routes).
        self.watched_names = 0
        #: Golden signals reported by instances, for the dashboard and /v1/stats.
        self.stats = StatsBook()
        #: The ADS server (``meshctl serve --xds-port``), fed from the lifespan; None without one.
        self.xds: XdsServer | None = None
        #: Writes from a browser must show this (it is in the dashboard page; it is not a credential).
        self.csrf_token = new_csrf_token()
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
            try:
                gone = await self.registry_writes.expire()
            except RegistryBusy as exc:
                log.warning("registry: expiry skipped: %s", exc)
                continue
            for instance_id in gone:
                log.info("registry: %s expired (no heartbeat within its TTL)", instance_id)

    # -- auth -------------------------------------------------------------------------------------

    @staticmethod
    def _bearer(request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

    def check_admin(self, request: Request, resources: Iterable[str] | None = None) -> Response | None:
        """None when the request may make this admin write: ``MESH_ADMIN_TOKEN`` may make any; an admin token
        scoped to services may change those services' rules (``resources``) and nothing else."""
        return self.admin_grant(request, resources)[1]

    def admin_grant(
        self, request: Request, resources: Iterable[str] | None = None
    ) -> tuple[Grant | None, Response | None]:
        """(the scoped admin token's grant, or None for MESH_ADMIN_TOKEN; the refusal, or None)."""
        token = self._bearer(request)
        if token is not None and self.tokens is not None and self.tokens.holds(token):
            checked = self.tokens.check(token)
            if isinstance(checked, str):
                return None, error(401, f"{checked}: ask the operator for a new one", reason="wrong")
            if checked.role != ADMIN:
                return None, error(
                    403,
                    f"{checked.describe()} is a join token (an instance's credential): admin writes need "
                    "MESH_ADMIN_TOKEN or an admin token (meshctl token create --admin --service NAME)",
                    reason="scope",
                )
            wanted = list(resources) if resources is not None else None
            outside = (
                ["everything (this write is not one service's)"]
                if wanted is None
                else [r for r in wanted if (service_of(r) is None or not checked.allows(service_of(r) or ""))]
            )
            if outside:
                return None, error(
                    403,
                    f"{checked.describe()} may change only the rules of its services, not "
                    f"{', '.join(o.removeprefix(SERVICE_PREFIX) for o in outside)}",
                    reason="scope",
                )
            return checked, None
        if self.admin_token is None:
            return None, error(403, "admin writes are disabled: start the control plane with MESH_ADMIN_TOKEN set")
        return None, self._token_refusal(request, self.admin_token, "MESH_ADMIN_TOKEN")

    def join_grant(self, request: Request) -> Grant | Response:
        """What this request's credential may act as (a join token's services, or any service for the shared
        development token and for loopback writes with no token configured), or the refusal to send."""
        token = self._bearer(request)
        if token is not None and self.tokens is not None and self.tokens.holds(token):
            checked = self.tokens.check(token)
            if isinstance(checked, str):
                return error(
                    401,
                    f"{checked}: ask the operator for a new one (meshctl token create)",
                    reason="wrong",
                    variable="MESH_BOOTSTRAP_TOKEN",
                )
            if checked.role != JOIN:
                return error(
                    403,
                    f"{checked.describe()} changes rules; it is no instance's credential: use a join token "
                    "(meshctl token create --service NAME) as MESH_BOOTSTRAP_TOKEN",
                    reason="scope",
                    variable="MESH_BOOTSTRAP_TOKEN",
                )
            return checked
        if self.registry_token is None:
            if token is None and (self.tokens is None or not self.tokens.active()):
                # no token configured at all (the development default): only processes on this machine may write,
                # as any service; once a join token exists, every write needs one. A browser's request is never
                # trusted for coming from loopback: any page the browser shows can send one
                client = request.client
                browser = "origin" in request.headers or "sec-fetch-site" in request.headers
                if client is not None and is_loopback(client.host) and not browser:
                    return ANY_SERVICE
            if token is None:
                return error(
                    403,
                    "registry writes need a join token: create one with meshctl token create --service NAME and "
                    "set it as MESH_BOOTSTRAP_TOKEN on the instance",
                    reason="missing",
                    variable="MESH_BOOTSTRAP_TOKEN",
                )
            return error(
                401,
                "wrong token: it is neither a join token of this control plane nor its shared MESH_BOOTSTRAP_TOKEN",
                reason="wrong",
                variable="MESH_BOOTSTRAP_TOKEN",
            )
        refusal = self._token_refusal(request, self.registry_token, "MESH_BOOTSTRAP_TOKEN")
        return refusal if refusal is not None else ANY_SERVICE

    @staticmethod
    def out_of_scope(grant: Grant, service: str, namespace: str | None = None) -> Response | None:
        """403 when ``grant`` may not act as ``service`` (in ``namespace``, for a certificate)."""
        if grant.allows(service, namespace):
            return None
        where = f" in namespace {namespace!r}" if namespace is not None else ""
        return error(403, f"{grant.describe()} may not act as {service!r}{where}", reason="scope")

    def _token_refusal(self, request: Request, expected: str, variable: str) -> Response | None:
        """None when the request carries ``expected``; else a 401 that tells a missing token from a wrong one."""
        token = self._bearer(request)
        if token is None:
            return error(
                401,
                f"no token sent: set {variable} to this control plane's {variable}",
                reason="missing",
                variable=variable,
            )
        if not hmac.compare_digest(token.encode(), expected.encode()):
            return error(
                401,
                f"wrong token: the {variable} sent is not this control plane's {variable}",
                reason="wrong",
                variable=variable,
            )
        return None


def build_app(cp: ControlPlane) -> Starlette:

    async def ca_sign(request: Request) -> Response:
        if cp.ca is None:
            return error(503, "this control plane has no CA: run meshctl ca init (or start it with --ca-cert/--ca-key)")
        if cp.registry_token is None and cp.tokens is None:
            return error(403, "certificate issuing is disabled: start the control plane with MESH_BOOTSTRAP_TOKEN set")
        grant = cp.join_grant(request)
        if isinstance(grant, Response):
            return grant
        if grant is ANY_SERVICE and cp.registry_token is None:
            return error(
                403,
                "certificate issuing needs a join token (meshctl token create --service NAME) or the "
                "shared MESH_BOOTSTRAP_TOKEN; a loopback caller without one gets none",
                reason="missing",
            )
        try:
            body = json.loads(await read_body(request, SMALL_BODY_BYTES) or b"null")
            if not isinstance(body, dict) or not isinstance(body.get("csr"), str):
                raise ValueError("expected a JSON object with csr (PEM) and service")
            service = body.get("service")
            namespace = body.get("namespace", "default")
            if not isinstance(service, str) or not isinstance(namespace, str):
                raise ValueError("service and namespace must be strings")
            refused = cp.out_of_scope(grant, service, namespace)
            if refused is not None:
                return refused
            lifetime = float(body.get("lifetime_seconds", DEFAULT_LEAF_LIFETIME.total_seconds()))
            if not 2 <= lifetime <= 7 * 86400:
                raise ValueError("lifetime_seconds must be between 2 and 604800")
            issued = cp.ca.sign_csr(body["csr"].encode(), service, namespace, timedelta(seconds=lifetime))
        except TooLarge:
            return too_large(SMALL_BODY_BYTES)
        except (ValueError, TypeError, OverflowError, RecursionError, CsrError) as exc:
            return error(400, f"cannot issue: {exc}")
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
            return error(503, "this control plane has no CA")
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
        # everything loaded so far (modules, classes, functions: ~30 ms for a full collection) lives as long as
        # the process: out of the collector's sight, so the collections that report and watch churn trigger stop
        # holding the event loop for tens of milliseconds each
        gc.collect()
        gc.freeze()
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(cp.expiry_loop())
        feeding = None
        if cp.xds is not None:
            from .xds_feed import feed  # only with an xDS port: it loads Envoy's protos (xds-protos)

            feeding = asyncio.create_task(feed(cp, cp.xds))
            book = cp.stats

            # Envoy sidecars' stats arrive on the xDS thread; the book is only touched on this loop
            def hand_over(report: Report) -> None:
                loop.call_soon_threadsafe(book.ingest, report)

            cp.xds.on_report = hand_over
        for follower in cp.followers:  # shared state written by other replicas reaches this one's watchers too
            follower.follow(lambda apply: loop.call_soon_threadsafe(apply))
        watch = getattr(cp.store, "watch", None)
        if watch is not None:  # a shared store: changes written by other config services reach our watchers too
            watch(lambda revision: loop.call_soon_threadsafe(cp.publish, revision))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if feeding is not None:
                feeding.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await feeding

    return Starlette(
        routes=[
            *ui_routes(cp),  # first: /v1/rules/diff before /v1/rules/{version}
            *rules_routes(cp),
            *registry_routes(cp),
            *prometheus_routes(cp),
            Route("/v1/ca/sign", ca_sign, methods=["POST"]),
            Route("/v1/ca/roots", ca_roots, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            *stats_routes(cp),
            *token_routes(cp),
            *xds_routes(cp),
        ],
        middleware=[Middleware(HostGuard, hosts=cp.allowed_hosts), Middleware(CsrfGuard, token=cp.csrf_token)],
        lifespan=lifespan,
    )
