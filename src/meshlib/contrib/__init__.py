"""Framework glue: one line to put an application's inbound side in the mesh (ASGI, Flask, Django).

``meshlib.contrib.flask``, ``.fastapi``, ``.django``, ``.asgi`` and ``.wsgi`` load on first use."""

import importlib
from typing import Any

_MODULES = ("asgi", "django", "fastapi", "flask", "wsgi")


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'meshlib.contrib' has no attribute {name!r} (one of: {', '.join(_MODULES)})")
