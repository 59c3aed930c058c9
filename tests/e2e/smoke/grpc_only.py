"""Run in a venv with only ``meshlib[grpc]``: a mesh gRPC server and a mesh channel calling it, no HTTP server
library anywhere."""

import importlib.util
import sys

import grpc
import meshlib
import meshlib.grpc

for absent in ("uvicorn", "starlette", "flask", "django", "consul", "a2wsgi"):
    assert importlib.util.find_spec(absent) is None, f"{absent} is installed: this venv must hold [grpc] only"


def hello(request: bytes, context: grpc.ServicerContext) -> bytes:
    return b"hello " + request


handler = grpc.method_handlers_generic_handler("smoke.Greeter", {"Hello": grpc.unary_unary_rpc_method_handler(hello)})
mesh = meshlib.Mesh(service="greeter", discovery="static:unused=127.0.0.1:1", control_plane="", telemetry=False)
server = meshlib.grpc.server(port=0, host="127.0.0.1", mesh=mesh)
server.add_generic_rpc_handlers((handler,))
server.start()
caller = meshlib.Mesh(
    service="caller", discovery=f"static:greeter=127.0.0.1:{server.port}", control_plane="", telemetry=False
)
channel = caller.grpc_channel("greeter")
say = channel.unary_unary("/smoke.Greeter/Hello")
assert say(b"mesh", timeout=10) == b"hello mesh"
aio_channel_class = meshlib.grpc.aio.Channel
channel.close()
server.stop(None)
print("grpc-only smoke: ok", aio_channel_class.__name__, "uvicorn" in sys.modules)
