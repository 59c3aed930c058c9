"""payments: charges a card (FastAPI). Runs as v1 or v2 (``PAYMENTS_VERSION``), registered with that tag, so
rules can shift traffic between the versions."""

from __future__ import annotations

import os
import uuid

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from meshlib.contrib.fastapi import MeshMiddleware

app = FastAPI(title="payments")
app.add_middleware(MeshMiddleware)  # the one line: identity, authorization, deadlines, traces, metrics
VERSION = os.environ.get("PAYMENTS_VERSION", "v1")
INSTANCE = os.environ.get("DEMO_INSTANCE", f"payments-{VERSION}")
#: For the demo's "broken instance" scene: this instance answers 503 to every charge.
BROKEN = os.environ.get("PAYMENTS_BROKEN") == "1"


class Charge(BaseModel):
    amount_cents: int
    currency: str = "EUR"


@app.post("/charge")
async def charge(body: Charge) -> JSONResponse:
    if BROKEN:
        return JSONResponse({"error": "card processor unavailable", "served_by": INSTANCE}, status_code=503)
    return JSONResponse(
        {
            "charge_id": str(uuid.uuid4()),
            "amount_cents": body.amount_cents,
            "currency": body.currency,
            "version": VERSION,
            "served_by": INSTANCE,
        }
    )


if __name__ == "__main__":
    import meshlib

    meshlib.serve(app, service="payments", port=int(os.environ.get("PORT", "8003")), tags=[VERSION])
