"""What every meshctl command that talks to the control plane shares: the URL, the admin token, one-line errors."""

from __future__ import annotations

import argparse
import json
from typing import Any

import httpx

from .settings import env_value

DEFAULT_CONTROL_PLANE = "http://127.0.0.1:7400"


class CliError(Exception):
    """Reported as one line on stderr with exit status 1; never a traceback."""


def control_plane_url(args: argparse.Namespace) -> str:
    return str(args.control_plane or env_value("control_plane") or DEFAULT_CONTROL_PLANE).rstrip("/")


def admin_headers() -> dict[str, str]:
    token = env_value("admin_token")
    return {"authorization": f"Bearer {token}"} if token else {}


def request(args: argparse.Namespace, method: str, path: str, **kwargs: Any) -> httpx.Response:
    url = control_plane_url(args) + path
    try:
        return httpx.request(method, url, timeout=10, trust_env=False, **kwargs)
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach the control plane at {control_plane_url(args)}: {exc}") from None


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
