"""FastAPI / Starlette: ``app.add_middleware(MeshMiddleware)`` — a pure ASGI middleware (see ``contrib.asgi``)."""

from .asgi import MeshMiddleware, peer_identity, peer_of

__all__ = ["MeshMiddleware", "peer_identity", "peer_of"]
