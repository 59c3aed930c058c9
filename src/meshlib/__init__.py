"""meshlib: a service mesh inside the process.

Public API only; see ``docs/`` and ``shared/design.md``.
"""

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
]
