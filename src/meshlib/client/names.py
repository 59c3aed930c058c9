"""Which URL hosts are mesh services (``payments``, ``payments.mesh``) and which go straight through."""

from __future__ import annotations

_SERVICE_NAMES: dict[str, str | None] = {}


def mesh_service_name(host: str) -> str | None:
    """The mesh service a URL host names, or None for a host that goes straight through.

    ``payments`` and ``payments.mesh`` (also ``payments.<namespace>.mesh``) are mesh services; anything with a
    dot, an IP address, or ``localhost`` is not.
    """
    try:
        return _SERVICE_NAMES[host]
    except KeyError:
        pass
    name: str | None
    if host.endswith(".mesh"):
        name = host.split(".", 1)[0] or None
    elif not host or "." in host or ":" in host or host == "localhost":
        name = None
    else:
        name = host
    if len(_SERVICE_NAMES) < 4096:
        _SERVICE_NAMES[host] = name
    return name


# -- exceptions ----------------------------------------------------------------------------------
