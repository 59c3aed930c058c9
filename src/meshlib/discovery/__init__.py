"""Service discovery backends. All are watch-based: snapshots are pushed to the mesh, never polled per request."""

from .base import Discovery, Listener
from .static import StaticDiscovery, parse_static_spec

__all__ = ["Discovery", "Listener", "StaticDiscovery", "parse_static_spec"]
