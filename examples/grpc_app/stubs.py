"""The generated gRPC code for inventory.proto, made with grpcio-tools the first time it is needed (into
``_generated/`` beside this file) rather than committed: change the .proto and the next run regenerates."""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
PROTO = HERE / "inventory.proto"
OUT = HERE / "_generated"


def ensure_generated() -> Path:
    """Generate once per change of the .proto; safe when several processes start at once (atomic rename)."""
    stamp = OUT / ".source-mtime"
    wanted = str(PROTO.stat().st_mtime_ns)
    if stamp.exists() and stamp.read_text() == wanted:
        return OUT
    try:
        from grpc_tools import protoc
    except ImportError:
        raise SystemExit(
            "the inventory example generates its gRPC code with grpcio-tools: pip install grpcio-tools "
            "(it comes with meshlib[demo] and meshlib[dev])"
        ) from None
    tmp = Path(tempfile.mkdtemp(prefix="_generated-", dir=HERE))
    code = protoc.main(["protoc", f"-I{HERE}", f"--python_out={tmp}", f"--grpc_python_out={tmp}", str(PROTO)])
    if code != 0:
        raise SystemExit(f"protoc failed on {PROTO} (exit {code})")
    (tmp / ".source-mtime").write_text(wanted)
    try:
        os.replace(tmp, OUT)  # atomic when OUT does not exist yet
    except OSError:  # another process won, or an old copy is there: replace it file by file
        OUT.mkdir(exist_ok=True)
        for item in tmp.iterdir():
            os.replace(item, OUT / item.name)
        tmp.rmdir()
    return OUT


def load() -> tuple[ModuleType, ModuleType]:
    """(inventory_pb2, inventory_pb2_grpc)."""
    path = str(ensure_generated())
    if path not in sys.path:
        sys.path.insert(0, path)
    return importlib.import_module("inventory_pb2"), importlib.import_module("inventory_pb2_grpc")
