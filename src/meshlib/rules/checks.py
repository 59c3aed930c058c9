"""Checks shared by the rules document's validation: durations, and a checker that collects every problem with its
path instead of stopping at the first."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError

_DURATION = re.compile(r"^\s*(\d{1,12}(?:\.\d{1,9})?)\s*(ms|s|m|h)\s*$")
#: Every duration in a rules document (timeouts, delays, open_for) is at most this: 1 hour.
MAX_DURATION = 3600.0
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True, slots=True)
class RuleError:
    path: str
    error: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "error": self.error}

    def __str__(self) -> str:
        return f"{self.path}: {self.error}"


class RulesValidationError(ConfigurationError):
    """A rules document is invalid; ``errors`` lists every problem with its path. Nothing was applied."""

    def __init__(self, errors: list[RuleError]) -> None:
        self.errors = errors
        lines = "\n".join(f"  - {e}" for e in errors)
        super().__init__(f"invalid rules ({len(errors)} problem(s)):\n{lines}")


def _limit_text(seconds: float) -> str:
    return f"{seconds / 3600:g}h" if seconds >= 3600 else f"{seconds:g}s"


def parse_duration(value: Any, maximum: float = MAX_DURATION) -> float:
    """A positive, finite duration in seconds, at most ``maximum``; ValueError saying what is accepted."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 500ms, 2s, 1m")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
    elif isinstance(value, str):
        m = _DURATION.match(value) if len(value) <= 40 else None
        if not m:
            shown = value if len(value) <= 40 else value[:37] + "..."
            raise ValueError(f"{shown!r} is not a duration: use a number with ms, s, m or h (e.g. 500ms, 2s)")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError("expected a duration like 500ms, 2s, 1m")
    if not math.isfinite(seconds):
        raise ValueError("must be a finite duration")
    if seconds <= 0:
        raise ValueError("must be greater than zero")
    if seconds > maximum:
        raise ValueError(f"must be at most {_limit_text(maximum)}")
    return seconds


class Checker:
    """Collects every problem of a document by path, so one answer lists them all."""

    def __init__(self) -> None:
        self.errors: list[RuleError] = []
        self.warnings: list[RuleError] = []

    def err(self, path: str, message: str) -> None:
        self.errors.append(RuleError(path, message))

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(RuleError(path, message))

    def mapping(self, value: Any, path: str, allowed: set[str] | None = None) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.err(path, f"expected a mapping, got {type(value).__name__}")
            return {}
        if allowed is not None:
            for key in value:
                if key not in allowed:
                    self.err(f"{path}.{key}", f"unknown field (allowed: {', '.join(sorted(allowed))})")
        return value

    def duration(self, value: Any, path: str) -> float | None:
        if value is None:
            return None
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.err(path, str(exc))
            return None

    def integer(self, value: Any, path: str, low: int, high: int | None = None) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.err(path, f"expected an integer, got {value!r}")
            return None
        if value < low or (high is not None and value > high):
            self.err(path, f"must be between {low} and {high}" if high is not None else f"must be >= {low}")
            return None
        return value

    def number(self, value: Any, path: str, low: float, high: float | None = None) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.err(path, f"expected a number, got {value!r}")
            return None
        if isinstance(value, float) and not math.isfinite(value):
            self.err(path, "must be a finite number")
            return None
        if value < low or (high is not None and value > high):
            self.err(path, f"must be between {low:g} and {high:g}" if high is not None else f"must be >= {low:g}")
            return None
        return float(value)

    def boolean(self, value: Any, path: str) -> bool | None:
        if value is None:
            return None
        if not isinstance(value, bool):
            self.err(path, f"expected true or false, got {value!r}")
            return None
        return value

    def strings(self, value: Any, path: str) -> list[str]:
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.err(path, "expected a list of non-empty strings")
            return []
        return list(value)
