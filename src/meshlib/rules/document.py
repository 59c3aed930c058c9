"""Reading a rules document from untrusted text, bounded in size, depth and work.

Rules are JSON-compatible data. YAML is accepted because people write it, but only the part of YAML that is JSON:
- no anchors or aliases (a 459-byte "billion laughs" document expands to gigabytes);
- no tags beyond the plain scalars, and no dates, sets, binary or ordered maps (they do not survive JSON);
- only finite numbers, string keys, and bounded nesting, size and node count.
YAML 1.2 booleans: only true/false (YAML 1.1 would read the design's own ``on:`` key as ``True``).
Everything that fails is a ConfigurationError that names the source, the place and what to do.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import ConfigurationError

#: Largest rules document accepted (bytes); the control plane answers 413 past it.
MAX_DOCUMENT_BYTES = 1 << 20


def check_json(value: Any, path: str) -> None:
    """Only what JSON can carry, with finite numbers and string keys (after YAML construction)."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, dict):
            for key, sub in item.items():
                if not isinstance(key, str):
                    raise ConfigurationError(f"{where}: key {key!r} must be a string")
                stack.append((sub, f"{where}.{key}"))
        elif isinstance(item, list):
            stack.extend((sub, f"{where}[{i}]") for i, sub in enumerate(item))
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise ConfigurationError(f"{where}: {item!r} is not a finite number")
        elif item is not None and not isinstance(item, str | int | bool):
            raise ConfigurationError(f"{where}: a {type(item).__name__} is not a JSON value")


def parse_document(text: str | bytes, source: str = "rules", max_bytes: int = MAX_DOCUMENT_BYTES) -> Any:
    """Parse YAML or JSON text into JSON-compatible data; ConfigurationError naming ``source`` on anything else."""
    size = len(text.encode() if isinstance(text, str) else text)
    if size > max_bytes:
        raise ConfigurationError(f"{source}: {size} bytes is over the limit of {max_bytes} bytes for a rules document")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigurationError(f"{source}: not UTF-8 text (byte {exc.start})") from None
    # PyYAML at the first document read (1.5 MB of RSS that a client with no rules file never pays for)
    import yaml

    from .bounded_yaml import BoundedJsonYamlLoader

    try:
        document = yaml.load(text, Loader=BoundedJsonYamlLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigurationError(f"{source}: not valid YAML or JSON{where}: {problem}") from None
    except (RecursionError, ValueError, OverflowError) as exc:
        raise ConfigurationError(f"{source}: not a usable document: {exc}") from None
    if document is None:
        return {}
    check_json(document, "$")
    return document
