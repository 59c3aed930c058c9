"""``meshlib.grpc.aio`` after ``import meshlib.grpc``, as ``grpc.aio`` after ``import grpc`` (issue 30, item 8): in a
fresh interpreter, since the order of imports is what is tested."""

from __future__ import annotations

import subprocess
import sys


def test_meshlib_grpc_aio_is_reachable_after_import_meshlib_grpc() -> None:
    """Item 8: as ``import grpc; grpc.aio``."""
    code = "import meshlib.grpc; print(meshlib.grpc.aio.Channel.__name__, meshlib.grpc.aio.insecure_channel)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("AioChannel")
