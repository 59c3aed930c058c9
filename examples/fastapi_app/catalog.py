"""catalog: the product list (FastAPI). Plain application code; the mesh is only ``meshlib.serve`` and, for the
stock levels it asks the inventory service for over gRPC, ``meshlib.grpc.aio.insecure_channel("inventory")``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import grpc
from fastapi import FastAPI, HTTPException

import meshlib.grpc.aio
from meshlib.contrib.fastapi import MeshMiddleware

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "grpc_app"))
import stubs

inventory_pb2, inventory_pb2_grpc = stubs.load()

app = FastAPI(title="catalog")
app.add_middleware(MeshMiddleware)  # the one line: identity, authorization, deadlines, traces, metrics
INSTANCE = os.environ.get("DEMO_INSTANCE", "catalog")

ITEMS = {
    "1": {"id": "1", "name": "espresso beans", "price_cents": 1290},
    "2": {"id": "2", "name": "pour-over kettle", "price_cents": 4900},
    "3": {"id": "3", "name": "ceramic cup", "price_cents": 1500},
}


@app.get("/items")
async def list_items() -> dict[str, object]:
    return {"items": list(ITEMS.values()), "served_by": INSTANCE}


_inventory: Any = None


def inventory() -> Any:
    """The inventory stub: the generated one, unchanged, on a mesh channel (made on first use, in the server's loop)."""
    global _inventory
    if _inventory is None:
        _inventory = inventory_pb2_grpc.InventoryStub(meshlib.grpc.aio.insecure_channel("inventory"))
    return _inventory


@app.get("/items/{item_id}")
async def get_item(item_id: str) -> dict[str, object]:
    item = ITEMS.get(item_id)
    if item is None:
        raise HTTPException(404, f"no item {item_id}")
    try:
        stock = await inventory().Stock(inventory_pb2.StockRequest(item_ids=[item_id]), timeout=2)
    except grpc.RpcError as exc:
        raise HTTPException(503, f"inventory: {exc.code().name}: {exc.details()}") from None
    return {**item, "in_stock": stock.in_stock.get(item_id, 0), "stock_from": stock.served_by, "served_by": INSTANCE}


if __name__ == "__main__":
    import meshlib

    meshlib.serve(app, service="catalog", port=int(os.environ.get("PORT", "8001")))
