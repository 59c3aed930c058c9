"""The control plane answers only the host names it serves: the defence against DNS rebinding.

A page on ``evil.example`` whose name is re-pointed at 127.0.0.1 is, to the browser, same-origin with a control
plane on loopback: it could read the dashboard (and its CSRF token) and write as a local process. The browser
still sends ``Host: evil.example``, so a request for a name the control plane does not serve is refused (421).
IP literals are always served (a rebinding needs a name), and so are ``localhost``, this machine's names, the
``--host`` and ``--tls-name`` values, and every ``--allowed-host`` (``*`` turns the check off)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from .requests import error


def host_name(header: bytes) -> str:
    """The name in a ``Host`` header, without its port, lower-cased (``[::1]:7400`` -> ``::1``)."""
    text = header.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1:].split("]", 1)[0]
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


def is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def default_hosts(listen_host: str, extra: Iterable[str] = ()) -> frozenset[str]:
    names = {"localhost", listen_host.lower(), *(n.lower().rstrip(".") for n in extra)}
    try:
        hostname = socket.gethostname()
        names |= {hostname.lower(), socket.getfqdn(hostname).lower()}
    except OSError:
        pass
    return frozenset(n for n in names if n)


class HostGuard:
    """ASGI middleware: 421 for a ``Host`` this control plane does not serve (None: every host is served)."""

    def __init__(self, app: ASGIApp, hosts: frozenset[str] | None) -> None:
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.hosts is None or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = next((v for k, v in scope["headers"] if k == b"host"), b"")
        name = host_name(raw).rstrip(".")
        if not name or name in self.hosts or is_ip_literal(name):
            await self.app(scope, receive, send)
            return
        shown = raw.decode("latin-1")[:100].encode("unicode_escape").decode("ascii")
        await error(
            421,
            f"this control plane does not serve the host name {shown!r} (a defence against DNS rebinding): "
            "start meshctl serve with --allowed-host NAME for each name clients use",
            reason="host",
        )(scope, receive, send)
