"""inventory: a gRPC service in the mesh. Plain grpc servicer code; the mesh is only ``meshlib.grpc.server``
(mTLS, identity and authorization, deadlines, traces, metrics, registration)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import stubs

import meshlib.grpc

inventory_pb2, inventory_pb2_grpc = stubs.load()
INSTANCE = os.environ.get("DEMO_INSTANCE", "inventory")
STOCK = {"1": 12, "2": 3, "3": 40}


class Inventory(inventory_pb2_grpc.InventoryServicer):  # type: ignore[misc, name-defined]
    def Stock(self, request: Any, context: Any) -> Any:
        wanted = list(request.item_ids) or list(STOCK)
        return inventory_pb2.StockReply(in_stock={i: STOCK.get(i, 0) for i in wanted}, served_by=INSTANCE)

    def Watch(self, request: Any, context: Any) -> Any:
        wanted = list(request.item_ids) or list(STOCK)
        for sold in range(3):
            yield inventory_pb2.StockReply(
                in_stock={i: max(0, STOCK.get(i, 0) - sold) for i in wanted}, served_by=INSTANCE
            )


def main() -> None:
    server = meshlib.grpc.server(service="inventory", port=int(os.environ.get("PORT", "50051")))
    inventory_pb2_grpc.add_InventoryServicer_to_server(Inventory(), server)
    server.serve_forever()


if __name__ == "__main__":
    main()
