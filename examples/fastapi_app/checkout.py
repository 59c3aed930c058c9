"""checkout: prices an order and charges it through payments (FastAPI). Calls payments with meshlib.AsyncClient:
the logical name ``http://payments`` is resolved, balanced, retried and routed by the mesh."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

import meshlib
from meshlib.contrib.fastapi import MeshMiddleware

INSTANCE = os.environ.get("DEMO_INSTANCE", "checkout")
client: meshlib.AsyncClient | None = None


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    global client
    client = meshlib.AsyncClient(timeout=5)
    yield
    await client.aclose()


app = FastAPI(title="checkout", lifespan=lifespan)
app.add_middleware(MeshMiddleware)  # the one line: identity, authorization, deadlines, traces, metrics


class Order(BaseModel):
    item_id: str
    quantity: int = 1
    unit_price_cents: int


@app.post("/checkout")
async def checkout(order: Order) -> dict[str, object]:
    assert client is not None
    total = order.quantity * order.unit_price_cents
    try:
        charged = await client.post("http://payments/charge", json={"amount_cents": total})
    except meshlib.MeshError as exc:
        raise HTTPException(502, f"payments unavailable: {exc}") from None
    if charged.status_code != 200:
        raise HTTPException(502, f"payments answered {charged.status_code}")
    payment = charged.json()
    return {"total_cents": total, "payment": payment, "served_by": INSTANCE}


if __name__ == "__main__":
    meshlib.serve(app, service="checkout", port=int(os.environ.get("PORT", "8002")))
