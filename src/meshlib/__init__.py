"""meshlib: a service mesh inside the process.

Public API only; see ``docs/``. ``meshlib.contrib`` (framework glue) is importable from here too:
``import meshlib; meshlib.contrib.flask.Mesh(app)``.
"""

import importlib
from typing import TYPE_CHECKING, Any

from .client.clients import AsyncClient, Client
from .errors import (
    CircuitOpenError,
    ConfigurationError,
    DeadlineExceededError,
    IdentityError,
    MeshError,
    NoEndpointsError,
    RetryBudgetExhaustedError,
    UnavailableError,
)
from .mesh import Mesh
from .settings import MeshSettings

__version__ = "0.1.0"


if TYPE_CHECKING:
    from .server import serve  # the full, typed signature for type checkers and IDEs
else:

    def serve(app: Any, **kwargs: Any) -> None:
        """Run an ASGI or WSGI app as a mesh instance (``meshlib.server.serve``; needs ``meshlib[server]``)."""
        from .server import serve as _serve

        _serve(app, **kwargs)


def __getattr__(name: str) -> Any:
    # framework glue on first use, so that ``import meshlib`` does not import Flask, Django or Starlette
    if name == "contrib":
        return importlib.import_module(".contrib", __name__)
    raise AttributeError(f"module 'meshlib' has no attribute {name!r}")


__all__ = [
    "AsyncClient",
    "CircuitOpenError",
    "Client",
    "ConfigurationError",
    "DeadlineExceededError",
    "IdentityError",
    "Mesh",
    "MeshError",
    "MeshSettings",
    "NoEndpointsError",
    "RetryBudgetExhaustedError",
    "UnavailableError",
    "serve",
]
