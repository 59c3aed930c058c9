"""What the sync and the grpc.aio channel facades share: the service and mesh they stand for, their endpoint
channels, and the per-method object each stub method is (one real multicallable per endpoint channel)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import grpc

from ..runtime import Runtime, process_default
from ..telemetry.metrics import Histogram, Labels
from .endpoints import EndpointChannel, EndpointChannels, Options
from .quiet import QuietGate

C = TypeVar("C")
Serializer = Callable[[Any], bytes] | None
Deserializer = Callable[[bytes], Any] | None


class Facade(Generic[C]):
    """The part of a mesh channel that is not I/O: ``make``, ``close`` and ``connect`` are the shell's (sync
    or aio) ways to make, close and start connecting one real channel."""

    make_channel: Callable[[str, grpc.ChannelCredentials | None, Options], C]
    close_channel: Callable[[C], None]
    connect_channel: Callable[[C], None] | None = None

    def __init__(
        self,
        service: str,
        *,
        mesh: Runtime | None = None,
        options: Options | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        if mesh is not None:
            self.__dict__["mesh"] = mesh
        self.service = service
        self._options = tuple(options or ())
        self._credentials = credentials

    @functools.cached_property
    def mesh(self) -> Runtime:
        """The process default Mesh unless one was given, looked up at the first call (see ``meshlib.Client``)."""
        return process_default()

    @functools.cached_property
    def endpoints(self) -> EndpointChannels[C]:
        cls = type(self)
        return EndpointChannels(
            self.mesh,
            self.service,
            make=cls.make_channel,
            close=cls.close_channel,
            connect=cls.connect_channel,
            options=self._options,
            credentials=self._credentials,
        )

    @functools.cached_property
    def quiet_gate(self) -> QuietGate:
        """Whether tracing and logging let this channel's calls go quietly (``quiet.py``)."""
        return QuietGate()

    @functools.cached_property
    def quiet_success(self) -> tuple[Histogram, Labels] | None:
        """Where a quiet call that succeeded is counted (``quiet.py``): the duration histogram and its labels, made
        once; None with telemetry off."""
        tel = self.mesh.telemetry
        if tel is None:
            return None
        metrics = tel.metrics
        return metrics.client_duration, metrics.client_labels(self.service, "default", "POST", "2xx", "success")


class Method(Generic[C]):
    """One method of a facade (what ``channel.unary_unary(...)`` returns)."""

    __slots__ = ("deserializer", "facade", "key", "kind", "method", "registered", "serializer")

    def __init__(
        self,
        facade: Any,
        kind: str,
        method: str,
        serializer: Serializer,
        deserializer: Deserializer,
        registered: bool | None,
    ) -> None:
        self.facade = facade
        self.kind = kind
        self.method = method
        self.serializer = serializer
        self.deserializer = deserializer
        self.registered = registered
        self.key = (kind, method)

    def on(self, record: EndpointChannel[C]) -> Any:
        """The real multicallable on ``record``'s channel, made once."""
        real = record.callables.get(self.key)
        if real is None:
            make = getattr(record.channel, self.kind)
            real = record.callables[self.key] = make(
                self.method, self.serializer, self.deserializer, _registered_method=self.registered
            )
        return real


def method_of(kind: str, cls: Callable[..., Any]) -> Callable[..., Any]:
    """``Channel.unary_unary`` and its three siblings, as grpc's channels spell them."""

    def make(
        self: Any,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return cls(self, kind, method, request_serializer, response_deserializer, _registered_method)

    make.__name__ = kind
    return make


def with_compression(options: Options | None, compression: Any) -> Options:
    """Channel options with ``compression`` (grpc's channel argument) as the default compression algorithm."""
    opts = tuple(options or ())
    if compression is not None:
        opts += (("grpc.default_compression_algorithm", int(compression)),)
    return opts
