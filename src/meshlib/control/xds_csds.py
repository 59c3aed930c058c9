"""CSDS (``envoy.service.status.v3.ClientStatusDiscoveryService``) on the ADS port: what each connected xDS node
was sent, accepted and refused, per resource, in the format every xDS tool reads (``grpcurl``, Istio's
``proxy-status`` style tooling, grpcio-csds clients). The same state as ``GET /v1/xds/clients``.

Per resource of each type a node subscribed to: SYNCED (it accepted the version it was sent), STALE (sent, not
answered yet), ERROR (it refused the version: its reason is the resource's ``error_state``, and it keeps the
version it accepted before), NOT_SENT (asked for, nothing to send: the mesh has no such resource). Answers are
bounded: resource contents are left out once ``MAX_CONTENT_BYTES`` of them are in one answer, and a request may
name at most ``MAX_MATCHERS`` node matchers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

from envoy.admin.v3 import config_dump_shared_pb2 as dump_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc
from envoy.type.matcher.v3 import node_pb2

if TYPE_CHECKING:
    from .xds_server import XdsServer, _Stream

#: Resource contents one answer carries at most; past it, entries come without ``xds_config``.
MAX_CONTENT_BYTES = 2 << 20
MAX_MATCHERS = 16


def _matches(matcher: node_pb2.NodeMatcher, stream: _Stream) -> bool:
    """Node id matching (exact, prefix, suffix, contains); a matcher on node metadata matches nothing (the
    server keeps no node metadata)."""
    if matcher.node_metadatas:
        return False
    if not matcher.HasField("node_id"):
        return True
    which = matcher.node_id.WhichOneof("match_pattern")
    node_id, pattern = stream.node, getattr(matcher.node_id, which or "exact")
    if which == "prefix":
        return node_id.startswith(pattern)
    if which == "suffix":
        return node_id.endswith(pattern)
    if which == "contains":
        return pattern in node_id
    return bool(which == "exact" and node_id == pattern)


def _resource_status(
    stream: _Stream, kind: str, name: str, present: bool
) -> tuple[int, int, dump_pb2.UpdateFailureState | None]:
    """(config status, client status, failure) of one resource on one stream."""
    state = stream.types[kind]
    if not present or name not in state.sent_names:
        return csds_pb2.NOT_SENT, dump_pb2.REQUESTED, None
    if state.parked_version and state.parked_version == state.sent_version:
        failure = dump_pb2.UpdateFailureState(details=state.error, version_info=state.parked_version)
        return csds_pb2.ERROR, dump_pb2.NACKED, failure
    if state.acked_version == state.sent_version:
        return csds_pb2.SYNCED, dump_pb2.ACKED, None
    return csds_pb2.STALE, dump_pb2.REQUESTED, None


def client_status(server: XdsServer, request: csds_pb2.ClientStatusRequest) -> csds_pb2.ClientStatusResponse:
    """One ``ClientConfig`` per connected node the request's matchers select (every node without a matcher)."""
    matchers = list(request.node_matchers)[:MAX_MATCHERS]
    snapshot = server._snapshot
    budget = 0 if request.exclude_resource_contents else MAX_CONTENT_BYTES
    response = csds_pb2.ClientStatusResponse()
    for stream, _ in list(server._streams.values()):
        if matchers and not any(_matches(m, stream) for m in matchers):
            continue
        config = response.config.add(node=base_pb2.Node(id=stream.node, cluster=stream.cluster))
        for kind, state in sorted(stream.types.items()):
            if not state.subscribed:
                continue
            by_name = (
                snapshot.by_name(kind, stream.tls, stream.identity_dir, stream.zone) if snapshot is not None else {}
            )
            names: Iterable[str] = sorted(state.names or state.sent_names)
            for name in names:
                resource = by_name.get(name)
                status, client, failure = _resource_status(stream, kind, name, resource is not None)
                entry = config.generic_xds_configs.add(
                    type_url=kind,
                    name=name,
                    version_info=state.acked_version,
                    config_status=status,
                    client_status=client,
                )
                if failure is not None:
                    entry.error_state.CopyFrom(failure)
                if resource is not None and resource.ByteSize() <= budget:
                    budget -= resource.ByteSize()
                    entry.xds_config.CopyFrom(resource)
    return response


class Csds(csds_pb2_grpc.ClientStatusDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, server: XdsServer) -> None:
        self.server = server

    async def FetchClientStatus(self, request: csds_pb2.ClientStatusRequest, context: Any) -> Any:
        return client_status(self.server, request)

    async def StreamClientStatus(
        self, request_iterator: AsyncIterator[csds_pb2.ClientStatusRequest], context: Any
    ) -> AsyncIterator[csds_pb2.ClientStatusResponse]:
        async for request in request_iterator:
            yield client_status(self.server, request)
