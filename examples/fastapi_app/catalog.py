"""catalog: the product list (FastAPI). Plain application code; the mesh is only ``meshlib.serve``."""

from __future__ import annotations

import os

from fastapi import FastAPI, HTTPException

from meshlib.contrib.fastapi import MeshMiddleware

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


@app.get("/items/{item_id}")
async def get_item(item_id: str) -> dict[str, object]:
    item = ITEMS.get(item_id)
    if item is None:
        raise HTTPException(404, f"no item {item_id}")
    return {**item, "served_by": INSTANCE}


if __name__ == "__main__":
    import meshlib

    meshlib.serve(app, service="catalog", port=int(os.environ.get("PORT", "8001")))
