"""What every meshctl command that talks to the control plane shares: the URL, the admin token, one-line errors."""

from __future__ import annotations

import argparse
import json
import ssl
from typing import Any

import httpx

from .replicas import replica_client
from .settings import env_value

DEFAULT_CONTROL_PLANE = "http://127.0.0.1:7400"


class CliError(Exception):
    """Reported as one line on stderr with exit status 1; never a traceback."""


def control_plane_url(args: argparse.Namespace) -> str:
    return str(args.control_plane or env_value("control_plane") or DEFAULT_CONTROL_PLANE).rstrip("/")


def admin_headers() -> dict[str, str]:
    token = env_value("admin_token")
    return {"authorization": f"Bearer {token}"} if token else {}


_CA_HINT = (
    "the PEM file of the CA that signed its certificate (meshctl serve --tls writes ca-roots.pem in its state "
    "directory)"
)


def _ca_file(args: argparse.Namespace) -> str:
    return str(getattr(args, "ca", None) or env_value("control_plane_ca"))


def verify(args: argparse.Namespace) -> ssl.SSLContext | bool:
    """How an https:// control plane is verified: against ``--ca`` or ``MESH_CONTROL_PLANE_CA`` when given (as
    instances do), else the system's roots."""
    ca = _ca_file(args)
    if not ca:
        return True
    try:
        return ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        source = "--ca" if getattr(args, "ca", None) else "MESH_CONTROL_PLANE_CA"
        raise CliError(f"{source}={ca!r}: not a usable CA file ({exc}); give {_CA_HINT}") from None


def request(args: argparse.Namespace, method: str, path: str, **kwargs: Any) -> httpx.Response:
    base = control_plane_url(args)
    checked = verify(args) if base.startswith("https://") else True
    try:
        if "," not in base:
            return httpx.request(method, base + path, timeout=10, trust_env=False, verify=checked, **kwargs)
        with replica_client(base, timeout=10, trust_env=False, verify=checked) as http:  # fails over
            return http.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
            ca = _ca_file(args)
            hint = (
                f"its certificate is not signed by the CA in {ca}: check MESH_CONTROL_PLANE_CA (or --ca)"
                if ca
                else f"its certificate is not trusted: set MESH_CONTROL_PLANE_CA (or pass --ca) to {_CA_HINT}"
            )
            raise CliError(f"cannot verify the control plane at {base}: {hint}") from None
        raise CliError(f"cannot reach the control plane at {base}: {exc}") from None


def check(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        body = {"error": response.text}
    if response.status_code >= 400:
        message = body.get("error", response.reason_phrase) if isinstance(body, dict) else str(body)
        lines = [f"{response.status_code}: {message}"]
        if isinstance(body, dict):
            lines += [f"  - {e['path']}: {e['error']}" for e in body.get("errors", [])]
        if response.status_code == 401:
            lines.append("  (set MESH_ADMIN_TOKEN to the control plane's admin token)")
        raise CliError("\n".join(lines))
    return body


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))
