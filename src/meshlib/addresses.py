"""Addresses from the network (registrations, discovery answers) read the way the OS will read them when dialing.

``2852039166``, ``0xa9fea9fe``, ``0251.0376.0251.0376`` and ``::ffff:169.254.169.254`` are all the cloud metadata
address to ``connect()``, and ``0`` is ``0.0.0.0``: a check on ``ipaddress.ip_address`` alone sees host names
there. So a numeric spelling is parsed as the resolver parses it (``getaddrinfo`` with ``AI_NUMERICHOST``, no
lookup), IPv4-mapped IPv6 addresses are checked as the IPv4 address they carry, and only then are unspecified,
link-local and multicast addresses refused. The registry stores the canonical form; clients check again before
they list an endpoint."""

from __future__ import annotations

import ipaddress
import re
import socket

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?$")


class UnsafeAddress(ValueError):
    """An address that must not be dialed for a mesh service (the message says why)."""


def numeric_ip(address: str) -> IPAddress | None:
    """The IP address ``address`` stands for when it is a numeric spelling of one (in any form the resolver
    accepts), else None (a host name, or not an address at all). Never a DNS lookup."""
    try:
        return ipaddress.ip_address(address)
    except ValueError:
        pass
    if not address or len(address) > 64 or not address.isascii():
        return None
    try:
        infos = socket.getaddrinfo(address, None, flags=socket.AI_NUMERICHOST)
    except (OSError, UnicodeError, ValueError):
        return None
    try:
        return ipaddress.ip_address(str(infos[0][4][0]).split("%", 1)[0])
    except (ValueError, IndexError):
        return None


def unsafe_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` is never a mesh endpoint (None: it may be)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_link_local:
        return "link-local (169.254.0.0/16 holds the cloud metadata service)"
    if ip.is_multicast:
        return "multicast"
    return None


def is_hostname(address: str) -> bool:
    return _HOSTNAME.match(address) is not None


def normalised(address: str, allow_unsafe: bool = False) -> str:
    """``address`` as it will be dialed: a numeric spelling in its canonical form, a host name as it is.
    ValueError when it is neither; UnsafeAddress when it is unspecified, link-local or multicast (unless
    ``allow_unsafe``)."""
    ip = numeric_ip(address)
    if ip is None:
        if not is_hostname(address):
            raise ValueError(f"{address[:80]!r} is neither an IP address nor a host name")
        return address
    reason = unsafe_reason(ip)
    if reason is not None and not allow_unsafe:
        shown = address if str(ip) == address else f"{address} ({ip})"
        raise UnsafeAddress(f"{shown} is {reason}")
    return str(ip)
