"""An Echo gRPC instance for tests: ``meshlib.grpc.server`` (or ``meshlib.grpc.aio.server`` with --aio), with the
generated stubs from $MESHLIB_TEST_STUBS; serves until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

sys.path.insert(0, os.environ["MESHLIB_TEST_STUBS"])
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import echo_pb2_grpc

import meshlib.grpc
import meshlib.grpc.aio
from grpc_support import Behaviour, make_aio_servicer, make_servicer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--service", default="echo")
    parser.add_argument("--aio", action="store_true")
    args = parser.parse_args()
    behaviour = Behaviour(args.name)
    if args.aio:

        async def run() -> None:
            server = meshlib.grpc.aio.server(service=args.service, port=0, drain_delay=0.2)
            echo_pb2_grpc.add_EchoServicer_to_server(make_aio_servicer(behaviour), server)
            await server.serve_forever(grace=5)

        asyncio.run(run())
    else:
        server = meshlib.grpc.server(service=args.service, port=0, drain_delay=0.2)
        echo_pb2_grpc.add_EchoServicer_to_server(make_servicer(behaviour), server)
        server.serve_forever(grace=5)


if __name__ == "__main__":
    main()
