"""Calling inventory from any meshed process: the generated stub is unchanged; only the channel line differs.

    channel = grpc.insecure_channel("10.0.0.7:50051")      # before: one address, chosen by you
    channel = meshlib.grpc.insecure_channel("inventory")  # after: discovery, balancing, retries, mTLS, tracing
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import stubs

import meshlib.grpc

inventory_pb2, inventory_pb2_grpc = stubs.load()


def main() -> None:
    channel = meshlib.grpc.insecure_channel("inventory")
    stub = inventory_pb2_grpc.InventoryStub(channel)
    for _ in range(4):
        reply = stub.Stock(inventory_pb2.StockRequest(item_ids=["1", "2"]), timeout=2)
        print(f"in stock: {dict(reply.in_stock)} (served by {reply.served_by})")
    for update in stub.Watch(inventory_pb2.StockRequest(item_ids=["2"])):
        print(f"update: {dict(update.in_stock)} (served by {update.served_by})")
    channel.close()


if __name__ == "__main__":
    main()
