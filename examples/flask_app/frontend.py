"""frontend: the shop's web front (Flask). Calls catalog and checkout with meshlib.Client."""

from __future__ import annotations

import os
import random

from flask import Flask, jsonify

import meshlib
from meshlib.contrib.flask import Mesh as MeshFlask

app = Flask("frontend")
MeshFlask(app)  # the one line: identity, authorization, deadlines, traces, metrics
INSTANCE = os.environ.get("DEMO_INSTANCE", "frontend")
client = meshlib.Client(timeout=5)


@app.get("/")
def home():  # type: ignore[no-untyped-def]
    items = client.get("http://catalog/items").json()["items"]
    return jsonify({"items": items, "served_by": INSTANCE})


@app.post("/buy")
def buy():  # type: ignore[no-untyped-def]
    item = client.get(f"http://catalog/items/{random.choice('123')}")
    item.raise_for_status()
    product = item.json()
    order = client.post(
        "http://checkout/checkout",
        json={"item_id": product["id"], "quantity": 1, "unit_price_cents": product["price_cents"]},
    )
    if order.status_code != 200:
        return jsonify({"error": order.json().get("detail", "checkout failed")}), 502
    receipt = order.json()
    return jsonify(
        {
            "item": product["name"],
            "total_cents": receipt["total_cents"],
            "payments_version": receipt["payment"]["version"],
            "served_by": INSTANCE,
        }
    )


if __name__ == "__main__":
    meshlib.serve(app, service="frontend", port=int(os.environ.get("PORT", "8000")))
