"""The state directory (``MESH_STATE_DIR``): last-known-good rules and endpoints, written atomically so a crash
mid-write never leaves a half file for the next start to trip over."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .files import write_atomic

log = logging.getLogger("meshlib.state")


class StateDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def save(self, name: str, value: Any) -> None:
        target = self.path / name
        try:
            write_atomic(target, json.dumps(value).encode())
        except OSError as exc:  # a read-only or full disk must not break the data path
            log.warning("could not write %s: %s", target, exc)

    def load(self, name: str) -> Any | None:
        target = self.path / name
        try:
            with open(target) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", target, exc)
            return None


def source_key(source: str) -> str:
    """A short, file-name-safe key for where cached data came from (a registry's or control plane's URL), so that
    a cache from one mesh is never restored into another."""
    import hashlib

    return hashlib.sha256(source.encode()).hexdigest()[:16]
