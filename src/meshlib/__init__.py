"""meshlib: a service mesh inside the process.

Public API only; see ``docs/`` and ``shared/design.md``.
"""

from typing import Any

from .errors import (
    CircuitOpenError,
    ConfigurationError,
    DeadlineExceededError,
    MeshError,
    NoEndpointsError,
    RetryBudgetExhaustedError,
    UnavailableError,
)
from .http import AsyncClient, Client
from .mesh import Mesh
from .settings import MeshSettings

__version__ = "0.1.0"


def serve(app: Any, **kwargs: Any) -> None:
    """Run an ASGI or WSGI app as a mesh instance (see ``meshlib.server.serve``; needs ``meshlib[server]``)."""
    from .server import serve as _serve

    _serve(app, **kwargs)


__all__ = [
    "AsyncClient",
    "CircuitOpenError",
    "Client",
    "ConfigurationError",
    "DeadlineExceededError",
    "Mesh",
    "MeshError",
    "MeshSettings",
    "NoEndpointsError",
    "RetryBudgetExhaustedError",
    "UnavailableError",
    "serve",
]
