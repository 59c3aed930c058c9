"""An Echo instance for gRPC tests that run servers in this process: a real ``meshlib.grpc.server`` on a free
loopback port, answering as its ``Behaviour`` says (or with a servicer of the test's own)."""

from __future__ import annotations

from typing import Any

import meshlib
import meshlib.grpc
from grpc_support import Behaviour, make_servicer, stubs
from meshlib.discovery import StaticDiscovery
from meshlib.endpoints import Endpoint

_, pb2_grpc = stubs()


class Instance:
    def __init__(self, name: str, max_workers: int = 16, servicer: Any = None) -> None:
        self.behaviour = Behaviour(name)
        self.mesh = meshlib.Mesh(service="echo", discovery=StaticDiscovery({}), control_plane="", telemetry=False)
        self.server = meshlib.grpc.server(mesh=self.mesh, port=0, drain_delay=0, max_workers=max_workers)
        pb2_grpc.add_EchoServicer_to_server(servicer or make_servicer(self.behaviour), self.server)
        self.server.start()
        self.endpoint = Endpoint("127.0.0.1", self.server.port)

    def stop(self) -> None:
        self.server.stop(0).wait(10)
        self.mesh.close()
