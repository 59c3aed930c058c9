"""One structured JSON line per request on the ``meshlib.access`` logger. Off by default, sampled by a setting.

Only fields that cannot carry secrets: no headers, no bodies, no query strings (tokens live there)."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from ..randomness import uniform

logger = logging.getLogger("meshlib.access")


class AccessLog:
    __slots__ = ("enabled", "sample")

    def __init__(self, enabled: bool, sample: float = 1.0) -> None:
        self.enabled = enabled
        self.sample = min(1.0, max(0.0, sample))
        if enabled:
            ensure_output()

    def may_write(self) -> bool:
        """Whether any line may be written (on, and INFO enabled): drawing no sample."""
        return self.enabled and logger.isEnabledFor(logging.INFO)

    def wanted(self) -> bool:
        """Whether this request's line is written: the sample is drawn here, so ask once per request. Cheap check
        first, so a disabled log costs one attribute read per request."""
        if not self.enabled or not logger.isEnabledFor(logging.INFO):
            return False
        return self.sample >= 1.0 or uniform() < self.sample

    @staticmethod
    def write(record: dict[str, Any]) -> None:
        logger.info(json.dumps(record, separators=(",", ":"), default=str))


def ensure_output() -> None:
    """``MESH_ACCESS_LOG=on`` must print lines under every runner. Python's default level (WARNING) drops INFO
    records, and a runner (uvicorn, gunicorn) configures its own loggers, not ours: so the logger gets INFO if
    nobody set a level, and a stdout handler (one JSON line per record) if no handler would take its records.
    A process that configured logging itself keeps its configuration."""
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.propagate = False  # a root handler added later would print each line twice
