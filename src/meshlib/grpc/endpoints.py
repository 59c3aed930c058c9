"""One real gRPC channel per endpoint, behind the channel facade.

gRPC Python cannot choose an endpoint per call (interceptors cannot, and a multi-address target is fixed when the
channel is made), so the facade picks the endpoint through the policy core and sends the call on that endpoint's
own channel. This module keeps those channels: made on first use, remade after a certificate rotation (new
credentials; the old channel finishes its calls), and closed once their endpoint has left discovery *and* their
last in-flight call has finished — ``Channel.close()`` would cancel calls in flight. Their grpc retry layer is
off (the mesh retries, on another instance), unless the application's channel options ask for it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import grpc

from ..endpoints import Endpoint
from ..policy.service import ServiceState
from ..runtime import Runtime

C = TypeVar("C")
Options = Sequence[tuple[str, Any]]

#: Channel options with which the application chose grpc's own retries (``grpc.enable_retries``, or a service
#: config, which may hold a retry policy): where one is given, the endpoint channels keep grpc's retry layer on.
_RETRY_OPTIONS = frozenset({"grpc.enable_retries", "grpc.service_config"})


class EndpointChannel(Generic[C]):
    """A real channel to one endpoint, with the calls in flight on it and the per-method callables made on it."""

    __slots__ = ("callables", "channel", "generation", "key", "label", "retired", "users")

    def __init__(self, key: tuple[str, int, str], label: str, channel: C, generation: int) -> None:
        self.key = key
        self.label = label
        self.channel = channel
        self.generation = generation
        self.retired = False
        #: One item per call in flight. A list, not a counter: ``append`` and ``pop`` are each atomic, so a call
        #: counts itself in and out without taking the channels' lock (``EndpointChannels.acquire``).
        self.users: list[None] = []
        #: (kind, method) -> the channel's multicallable, made once: stubs call the same few methods forever.
        self.callables: dict[tuple[str, str], Any] = {}

    @property
    def inflight(self) -> int:
        return len(self.users)


class EndpointChannels(Generic[C]):
    """The live channels of one facade (one destination service)."""

    def __init__(
        self,
        mesh: Runtime,
        service: str,
        *,
        make: Callable[[str, grpc.ChannelCredentials | None, Options], C],
        close: Callable[[C], None],
        connect: Callable[[C], None] | None = None,
        options: Options = (),
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.mesh = mesh
        self.service = service
        self._make = make
        self._close = close
        self._connect = connect
        self._options = tuple(options)
        self._user_credentials = credentials
        self._live: dict[tuple[str, int, str], EndpointChannel[C]] = {}
        self._retiring: list[EndpointChannel[C]] = []
        self._seen: object = None
        self._lock = threading.Lock()
        self._mesh_credentials: tuple[int, grpc.ChannelCredentials] | None = None
        self.closed = False
        self.server_name = f"{service}.{mesh.settings.namespace}.mesh"

    # -- per call -------------------------------------------------------------------------------------

    def acquire(self, endpoint: Endpoint, state: ServiceState) -> EndpointChannel[C]:
        """The channel for ``endpoint``, counted as in use until ``release``. The common case takes no lock: the
        call counts itself in, then looks whether the channel was retired meanwhile (``_retire`` marks it first,
        then counts its users, so one of the two always sees the other) and, if so, lets it go and takes the slow
        way."""
        if state.snapshot is not self._seen:
            self._follow(state)
        identity = self.mesh.identity
        generation = identity.rotations if identity is not None else 0
        record = self._live.get(endpoint.key)
        if record is not None and record.generation == generation:
            record.users.append(None)
            if not record.retired:
                return record
            self.release(record)
        with self._lock:
            record = self._live.get(endpoint.key)
            if record is None or record.generation != generation or record.retired:
                record = self._open(endpoint, generation, record)
            record.users.append(None)  # (under the lock: not retired before it is counted)
        return record

    def release(self, record: EndpointChannel[C]) -> None:
        record.users.pop()
        if record.retired:
            self._close_if_idle(record)

    def _close_if_idle(self, record: EndpointChannel[C]) -> None:
        """A retired channel's call ended: the last one out closes it (once: whoever takes it off the list)."""
        with self._lock:
            close = not record.users and record in self._retiring
            if close:
                self._retiring.remove(record)
        if close:
            self._close(record.channel)

    # -- lifecycle ------------------------------------------------------------------------------------

    def _open(self, endpoint: Endpoint, generation: int, old: EndpointChannel[C] | None) -> EndpointChannel[C]:
        """(Under the lock.) A new channel; the one it replaces (after a rotation) finishes its calls first."""
        if old is not None and not old.retired:
            self._retire(old)
        target = f"[{endpoint.address}]:{endpoint.port}" if ":" in endpoint.address else endpoint.authority
        credentials = self._credentials(endpoint, generation)
        options = list(self._options)
        if not any(name in _RETRY_OPTIONS for name, _ in options):
            # the mesh retries, on another instance; grpc's own retry layer on a one-endpoint channel could only
            # retry to the same instance, and it keeps every call's history for that: ~15 us of CPU a call
            options.append(("grpc.enable_retries", 0))
        if credentials is not None and self._user_credentials is None:
            # verify the server as <service>.<namespace>.mesh (its certificate's DNS name), whatever its address
            options.append(("grpc.ssl_target_name_override", self.server_name))
        elif credentials is None:
            options.append(("grpc.default_authority", self.service))
        record = EndpointChannel(endpoint.key, endpoint.authority, self._make(target, credentials, options), generation)
        self._live[endpoint.key] = record
        return record

    def _credentials(self, endpoint: Endpoint, generation: int) -> grpc.ChannelCredentials | None:
        if self._user_credentials is not None:
            return self._user_credentials
        mesh = self.mesh
        identity = mesh.identity
        # as for HTTP: mesh TLS on every hop, except that a permissive client honours an instance advertising
        # plaintext; strict never downgrades, whatever discovery says
        if identity is None or (not mesh.strict and endpoint.meta.get("mesh_tls") == "off"):
            return None
        cached = self._mesh_credentials
        if cached is None or cached[0] != generation:
            assert identity.pem is not None
            cert, key, roots = identity.pem
            cached = self._mesh_credentials = (
                generation,
                grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=cert),
            )
        return cached[1]

    def _retire(self, record: EndpointChannel[C]) -> None:
        """(Under the lock.) No new calls on ``record``; closed when its last call is done."""
        record.retired = True
        if self._live.get(record.key) is record:
            del self._live[record.key]
        if not record.users:
            self._close(record.channel)
        else:
            self._retiring.append(record)

    def _follow(self, state: ServiceState) -> None:
        """Discovery changed: channels of endpoints no longer listed are retired, and new endpoints get a channel
        that starts connecting now, as gRPC's own balancers do, so that no call pays for a handshake (and the
        balancer does not take a handshake for an endpoint's latency)."""
        identity = self.mesh.identity
        generation = identity.rotations if identity is not None else 0
        opened = []
        with self._lock:
            self._seen = state.snapshot
            listed = {handle.key: handle.endpoint for handle in state.handles}
            for key in [k for k in self._live if k not in listed]:
                self._retire(self._live[key])
            for key, endpoint in listed.items():
                if key not in self._live:
                    opened.append(self._open(endpoint, generation, None))
        if self._connect is not None:
            for record in opened:
                self._connect(record.channel)

    def close(self) -> list[C]:
        """Close every channel (in-flight calls are cancelled, as ``grpc.Channel.close`` does); the channels
        are returned for shells whose close is asynchronous."""
        with self._lock:
            self.closed = True
            channels = [r.channel for r in self._live.values()] + [r.channel for r in self._retiring]
            self._live.clear()
            self._retiring.clear()
        return channels

    def retiring(self) -> list[str]:
        """Endpoints gone from discovery whose channels wait for their last call to end before closing."""
        with self._lock:
            return [r.label for r in self._retiring]

    def labels(self) -> list[str]:
        return [record.label for record in self._live.values()]
