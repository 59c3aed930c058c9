"""meshlib: a service mesh inside the process.

Public API only; see ``docs/``. Names load on first use (PEP 562), so that ``import meshlib.policy`` or
``meshlib.rules`` (the pure core, used by the control plane) imports no HTTP client, gRPC or OpenTelemetry, and
``import meshlib`` no Flask, Django or Starlette: ``meshlib.Client``, ``meshlib.Mesh``, ``meshlib.contrib.flask``.
"""

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_PUBLIC = {
    "AsyncClient": "meshlib.client.clients",
    "Client": "meshlib.client.clients",
    "CircuitOpenError": "meshlib.errors",
    "ConfigurationError": "meshlib.errors",
    "DeadlineExceededError": "meshlib.errors",
    "IdentityError": "meshlib.errors",
    "MeshError": "meshlib.errors",
    "NoEndpointsError": "meshlib.errors",
    "RetryBudgetExhaustedError": "meshlib.errors",
    "UnavailableError": "meshlib.errors",
    "Mesh": "meshlib.mesh",
    "MeshSettings": "meshlib.settings",
    "serve": "meshlib.server",
}
#: modules reachable as attributes (``meshlib.contrib.flask``, ``meshlib.grpc``)
_SUBMODULES = frozenset(("contrib", "grpc"))

if TYPE_CHECKING:
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
    from .server import serve
    from .settings import MeshSettings


def __getattr__(name: str) -> Any:
    where = _PUBLIC.get(name)
    if where is not None:
        if where == "meshlib.client.clients":
            importlib.import_module("meshlib.mesh")  # the process default a client binds to is the façade
        value = getattr(importlib.import_module(where), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'meshlib' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC, *_SUBMODULES])


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
