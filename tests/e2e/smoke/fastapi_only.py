"""Run in a venv with ``meshlib[fastapi]``: the ASGI middleware serves a FastAPI app and the mesh's endpoints."""

import asyncio
import importlib.util

import fastapi
import httpx

import meshlib
from meshlib.contrib.fastapi import MeshMiddleware

assert importlib.util.find_spec("grpc") is None and importlib.util.find_spec("flask") is None

app = fastapi.FastAPI()


@app.get("/items/{name}")
async def item(name: str) -> dict[str, str]:
    return {"item": name}


mesh = meshlib.Mesh(service="shop", discovery="static:x=127.0.0.1:1", control_plane="")
wrapped = MeshMiddleware(app, mesh=mesh)


async def main() -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=wrapped), base_url="http://shop.test") as client:
        assert (await client.get("/items/a")).json() == {"item": "a"}
        assert (await client.get("/-/mesh/health")).status_code == 200


asyncio.run(main())
print("fastapi smoke: ok")
