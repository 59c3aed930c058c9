"""The service name a process gets when none is given: the app's, not the runner's.

``python orders.py`` is ``orders``. Under a runner (``gunicorn shop.wsgi``, ``uvicorn orders.main:app``) the program
is the runner, so the name comes from the app spec the runner was given: its module path's first part that says
something (``wsgi``, ``main``, ``app`` say nothing), else the working directory's name. ``MESH_SERVICE`` or
``service=`` always wins over this guess.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

#: programs that run someone else's app: their own name is never the service's
RUNNERS = frozenset({"gunicorn", "uvicorn", "hypercorn", "daphne", "granian", "waitress-serve", "uwsgi"})
#: module names every project uses: they name a role, not a service
GENERIC = frozenset(
    {"app", "apps", "application", "api", "asgi", "wsgi", "main", "server", "service", "src", "web", "run", "wsgi_app"}
)
_APP_SPEC = re.compile(r"^[A-Za-z_][\w.]*(:.*)?$")
_NOT_A_NAME = re.compile(r"[^a-z0-9-]+")


def _clean(name: str) -> str:
    return _NOT_A_NAME.sub("-", name.lower()).strip("-")[:63].strip("-")


def _program(argv: Sequence[str]) -> str:
    path = Path(argv[0])
    # ``python -m gunicorn`` runs gunicorn/__main__.py
    return path.parent.name if path.stem == "__main__" else path.stem


def _app_spec(args: Sequence[str]) -> str | None:
    """The runner's app argument: ``module:attr`` if there is one, else the last bare dotted name."""
    candidates = [
        a
        for a in args
        if not a.startswith("-")
        and _APP_SPEC.match(a)
        and not a.endswith(".py")  # a config file (``-c gunicorn.conf.py``), not an app
        and a.split(".", 1)[0].split(":", 1)[0] not in RUNNERS  # a worker class (``-k uvicorn.workers.X``)
    ]
    with_attr = [a for a in candidates if ":" in a]
    if with_attr:
        return with_attr[-1]
    return candidates[-1] if candidates else None


def _from_module(module: str, cwd: str) -> str:
    parts = [p for p in (_clean(part) for part in module.split(".")) if p]
    for part in parts:
        if part not in GENERIC:
            return part
    here = _clean(Path(cwd).name)
    if here and here not in GENERIC:
        return here
    return parts[0] if parts else ""


def default_service(argv: Sequence[str], cwd: str) -> str:
    """The name this process would call itself, from its command line (``python`` when there is nothing to go on)."""
    if not argv or not argv[0]:
        return "python"
    program = _program(argv)
    if _clean(program) in RUNNERS:
        spec = _app_spec(argv[1:])
        name = _from_module(spec.split(":", 1)[0], cwd) if spec else ""
        return name or _clean(program)
    return _clean(program) or "python"


_warned = False


def warn_guessed_name(name: str) -> None:
    """Say once per process that the service name was guessed (it is what callers are authorized, traced and counted
    by, so a wrong guess should not pass unnoticed)."""
    global _warned
    if not _warned:
        _warned = True
        logging.getLogger("meshlib").warning(
            "meshlib: service name %r guessed from the command line; set MESH_SERVICE or pass service= (callers are "
            "authorized, traced and counted by it)",
            name,
        )
