"""Service discovery backends. All are watch-based: snapshots are pushed to the mesh, never polled per request."""

from .base import Discovery, Listener, NoRegistration, Registration
from .static import StaticDiscovery, parse_static_spec

__all__ = ["Discovery", "Listener", "NoRegistration", "Registration", "StaticDiscovery", "parse_static_spec"]
