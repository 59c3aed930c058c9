"""The control plane's ADS server: Envoy's ``AggregatedDiscoveryService``, state of the world (the protocol every
gRPC xDS client speaks), serving ``xds_resources.build_snapshot``'s resources on a port of its own.

It runs grpc.aio on a thread and event loop of its own (uvicorn may run the HTTP side on uvloop, which grpc.aio
does not support); the HTTP side hands it each new snapshot (``update``), thread-safe.

NACK-safe, per stream and resource type: a version a client refuses (a response whose nonce it answers with an
``error_detail``) is parked: never sent again, and the client keeps the version it last accepted; the next
change is a new version and goes out. Requests with a nonce that is not the last one sent are stale (the xDS
protocol's rule) and change nothing. What each node accepted and refused is kept for ``clients()``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.service.status.v3 import csds_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc

import grpc

from ..endpoints import zone_problem
from ..settings import validate_service_name
from .stats_report import Report
from .xds_bootstraps import validate_identity_dir
from .xds_csds import Csds
from .xds_names import IDENTITY_DIR_META
from .xds_resources import CLUSTER, ENDPOINTS, LISTENER, ROUTE, TYPES, Snapshot
from .xds_stats import EnvoyStats

log = logging.getLogger("meshlib.control.xds")

#: The type whose resources a client warms with, after each response of a type: clusters with their endpoints,
#: listeners with their routes.
_WARMED_BY = {CLUSTER: ENDPOINTS, LISTENER: ROUTE}

#: Most resource names one request may subscribe to, and most streams served at once.
MAX_NAMES = 10_000
MAX_STREAMS = 20_000


@dataclass
class _TypeState:
    """One resource type on one stream."""

    names: frozenset[str] = frozenset()  # empty: every resource of the type (wildcard)
    subscribed: bool = False
    sent_version: str = ""
    sent_nonce: str = ""
    sent_names: frozenset[str] = frozenset()
    acked_version: str = ""
    parked_version: str = ""  # refused by the client: never sent again
    error: str = ""
    #: Answer the next request for this type even if nothing changed: Envoy warms a cluster (or listener) it was
    #: just sent and waits, its CDS (LDS) answer held, for a response to the EDS (RDS) request it then makes.
    answer_next: bool = False


@dataclass
class _Stream:
    node: str
    cluster: str
    started: float
    types: dict[str, _TypeState] = field(default_factory=dict)
    nonce: int = 0
    nacks: int = 0
    sent: int = 0
    #: The node holds a mesh identity (its bootstrap names the ``mesh`` certificate provider): it gets mTLS clusters.
    tls: bool = False
    #: An Envoy node's identity directory (its metadata's ``mesh.identity_dir``): its clusters' mTLS reads the
    #: certificate through SDS files there.
    identity_dir: str | None = None
    #: The node's zone (``node.locality.zone``; "" for none or an invalid one): its endpoints come prioritised.
    zone: str = ""

    def view(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "cluster": self.cluster,
            "connected_for": round(time.monotonic() - self.started, 1),
            "responses": self.sent,
            "nacks": self.nacks,
            "mtls": self.tls,
            "identity_dir": self.identity_dir,
            "zone": self.zone,
            "types": {
                kind.rsplit(".", 1)[-1]: {
                    "acked": s.acked_version,
                    "sent": s.sent_version,
                    "parked": s.parked_version,
                    "error": s.error,
                }
                for kind, s in self.types.items()
            },
        }


class XdsServer:
    """``start(host, port)`` binds and serves; ``update(snapshot)`` from any thread; ``stop()``."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._snapshot: Snapshot | None = None
        self._versions: dict[str, str] = {}  # type -> version string of the current snapshot
        self._counter = 0
        self._streams: dict[int, tuple[_Stream, asyncio.Queue[Any]]] = {}
        self._server: grpc.aio.Server | None = None
        self.port = 0
        #: The ADS port serves mTLS (a mesh certificate required of every node), not plaintext.
        self.mtls = False
        #: Envoy sidecars' stats exports, as reports; ``on_report`` (set by the HTTP side) takes each one, from
        #: this server's thread.
        self.envoy_stats = EnvoyStats()
        self.on_report: Callable[[Report], None] | None = None

    # -- lifecycle (any thread) ---------------------------------------------------------------------------
    def start(self, host: str, port: int, tls: tuple[bytes, bytes, bytes] | None = None) -> int:
        """Bind and serve; ``tls``: (certificate chain, key, client roots) PEM for mTLS with a client certificate
        from the mesh CA required (an xDS client then proves it is a mesh member before it reads anything)."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(self._bind(host, port, tls))
            except BaseException as exc:  # a busy port: reported to start()'s caller
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="meshlib-xds", daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure:
            raise failure[0]
        return self.port

    async def _bind(self, host: str, port: int, tls: tuple[bytes, bytes, bytes] | None) -> None:
        server = grpc.aio.server(options=[("grpc.max_concurrent_streams", MAX_STREAMS)])
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(_Ads(self), server)
        csds_pb2_grpc.add_ClientStatusDiscoveryServiceServicer_to_server(Csds(self), server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_EnvoyMetrics(self), server)  # type: ignore[no-untyped-call]
        if tls is None:
            bound = server.add_insecure_port(f"{host}:{port}")
        else:
            chain, key, roots = tls
            credentials = grpc.ssl_server_credentials([(key, chain)], root_certificates=roots, require_client_auth=True)
            bound = server.add_secure_port(f"{host}:{port}", credentials)
            self.mtls = True
        if not bound:
            raise OSError(f"cannot listen for xDS on {host}:{port} (the port is in use?); pass another --xds-port")
        await server.start()
        self._server = server
        self.port = bound

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return
        server = self._server
        if server is not None:
            asyncio.run_coroutine_threadsafe(server.stop(0.5), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5)

    def update(self, snapshot: Snapshot) -> None:
        """A new snapshot (from the HTTP side's thread): every stream gets the types whose content changed."""
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._apply, snapshot)

    def clients(self) -> list[dict[str, Any]]:
        """Each connected node's accepted, sent and refused versions (a snapshot, safe from any thread)."""
        return [stream.view() for stream, _ in list(self._streams.values())]

    # -- on the xDS loop ------------------------------------------------------------------------------------
    def _apply(self, snapshot: Snapshot) -> None:
        old = self._snapshot
        self._snapshot = snapshot
        changed = [kind for kind in TYPES if old is None or old.digests[kind] != snapshot.digests[kind]]
        if not changed:
            return
        self._counter += 1
        for kind in changed:
            self._versions[kind] = f"{self._counter}-{snapshot.digests[kind][:8]}"
        for _, queue in self._streams.values():
            queue.put_nowait(changed)

    def response(self, stream: _Stream, kind: str, force: bool = False) -> discovery_pb2.DiscoveryResponse | None:
        """What ``stream`` should be sent for ``kind`` now, or None (nothing new, or the version is parked)."""
        snapshot = self._snapshot
        state = stream.types.get(kind)
        if snapshot is None or state is None or not state.subscribed:
            return None
        version = self._versions.get(kind, "")
        if version == state.parked_version:
            return None
        by_name = snapshot.by_name(kind, stream.tls, stream.identity_dir, stream.zone)
        names = state.names or frozenset(by_name)
        if not force and version == state.sent_version and names == state.sent_names:
            return None
        stream.nonce += 1
        state.sent_version, state.sent_nonce, state.sent_names = version, str(stream.nonce), names
        stream.sent += 1
        dependent = stream.types.get(_WARMED_BY.get(kind, ""))
        if dependent is not None:
            dependent.answer_next = True
        return discovery_pb2.DiscoveryResponse(
            version_info=version,
            type_url=kind,
            nonce=state.sent_nonce,
            resources=[by_name[name] for name in sorted(names) if name in by_name],
        )

    def received(self, stream: _Stream, request: discovery_pb2.DiscoveryRequest) -> str | None:
        """A request on ``stream``: the type to answer now, or None (an ACK, a NACK, a stale request)."""
        kind = str(request.type_url)
        if kind not in TYPES:
            return None
        state = stream.types.setdefault(kind, _TypeState())
        if request.response_nonce and request.response_nonce != state.sent_nonce:
            return None  # an answer to an older response: a newer one is on its way
        names = frozenset(list(request.resource_names)[:MAX_NAMES])
        if request.response_nonce and request.HasField("error_detail") and request.error_detail.code != 0:
            state.parked_version = state.sent_version
            state.error = request.error_detail.message[:500]
            stream.nacks += 1
            log.warning(
                "xds: %s refused %s version %s (kept: %s): %s",
                stream.node,
                kind.rsplit(".", 1)[-1],
                state.sent_version,
                request.version_info or "none",
                state.error,
            )
            if names == state.names:
                return None
        elif request.response_nonce:
            state.acked_version = request.version_info
            state.error = ""
        first = not state.subscribed
        state.subscribed = True
        if first or names != state.names or state.answer_next:
            state.names = names
            state.answer_next = False
            return kind
        return None


def _identity_dir(value: Any) -> str | None:
    """The node's identity directory, if it names a valid one (a bad one: the node is treated as gRPC)."""
    if value is None or not value.string_value:
        return None
    try:
        return validate_identity_dir(value.string_value)
    except ValueError as exc:
        log.warning("xds: ignoring a node's %s: %s", IDENTITY_DIR_META, exc)
        return None


class _Ads(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, server: XdsServer) -> None:
        self.server = server

    async def StreamAggregatedResources(
        self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest], context: Any
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        server = self.server
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stream = _Stream(node="", cluster="", started=time.monotonic())
        key = id(stream)
        server._streams[key] = (stream, queue)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    queue.put_nowait(request)
            finally:
                queue.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, discovery_pb2.DiscoveryRequest):
                    if not stream.node and item.HasField("node"):
                        stream.node, stream.cluster = item.node.id[:200], item.node.cluster[:200]
                        tls = item.node.metadata.fields.get("mesh.tls")
                        stream.tls = tls is not None and tls.string_value == "on"
                        stream.identity_dir = _identity_dir(item.node.metadata.fields.get(IDENTITY_DIR_META))
                        zone = item.node.locality.zone
                        stream.zone = "" if not zone or zone_problem(zone) else zone
                    kind = server.received(stream, item)
                    kinds = [] if kind is None else [kind]
                    force = True
                else:  # the kinds a new snapshot changed
                    kinds, force = item, False
                for kind in kinds:
                    response = server.response(stream, kind, force)
                    if response is not None:
                        yield response
        finally:
            reader.cancel()
            server._streams.pop(key, None)


#: The gRPC metadata an Envoy sidecar's stats sink names its node by (set in its bootstrap).
NODE_METADATA = "x-mesh-node"


class _EnvoyMetrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    """Envoy's OpenTelemetry stats sink (OTLP metrics over gRPC) on the ADS port. On the mTLS port the service is
    the certificate's, and the node id must be one of its (``<service>.<id>``); on a plaintext port (loopback, or
    ``--insecure``: as unauthenticated as the configuration it serves) the node id names the service."""

    def __init__(self, server: XdsServer) -> None:
        self.server = server

    async def Export(self, request: Any, context: Any) -> Any:
        metadata = dict((k, v) for k, v in (context.invocation_metadata() or ()) if isinstance(v, str))
        node = metadata.get(NODE_METADATA, "")[:200]
        claimed = node.partition(".")[0]
        identity = None
        if self.server.mtls:
            from ..security.tls import identity_from_pem

            pems = (context.auth_context() or {}).get("x509_pem_cert")
            peer = identity_from_pem(pems[0]) if pems else None
            if peer is None or peer.service != claimed:
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"stats for node {node[:80]!r} need a certificate of its service ({claimed or 'none named'})",
                )
            identity = peer.uri if peer is not None else None
        try:
            validate_service_name(claimed)
        except ValueError:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{NODE_METADATA} metadata: expected the node id <service>.<id> (from meshctl xds bootstrap)",
            )
        report = self.server.envoy_stats.export(node, claimed, identity, request)
        if report is not None and self.server.on_report is not None:
            self.server.on_report(report)
        return metrics_service_pb2.ExportMetricsServiceResponse()
