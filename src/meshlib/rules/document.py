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
import re
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.events import AliasEvent, CollectionStartEvent

from ..errors import ConfigurationError

#: Largest rules document accepted (bytes); the control plane answers 413 past it.
MAX_DOCUMENT_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_NODES = 200_000

_JSON_SCALAR_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
}
_COLLECTION_TAGS = {"tag:yaml.org,2002:seq", "tag:yaml.org,2002:map"}


class _BoundedJsonYamlLoader(yaml.SafeLoader):
    """SafeLoader that composes only JSON-shaped trees, and refuses the rest while composing (before anything is
    expanded or constructed)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event: Any = self.peek_event()  # type: ignore[no-untyped-call]
        mark: Any = event.start_mark
        if isinstance(event, AliasEvent):
            raise ComposerError(None, None, "YAML aliases (*name) are not allowed (rules are JSON data)", mark)
        if getattr(event, "anchor", None) is not None:
            raise ComposerError(None, None, "YAML anchors (&name) are not allowed (rules are JSON data)", mark)
        tag = getattr(event, "tag", None)
        if tag not in (None, "!") and tag not in _JSON_SCALAR_TAGS and tag not in _COLLECTION_TAGS:
            raise ComposerError(None, None, f"YAML tag {tag} is not allowed: use plain JSON values", mark)
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise ComposerError(None, None, f"more than {MAX_NODES} values in one document", mark)
        if isinstance(event, CollectionStartEvent):
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", mark)
            try:
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1
        return super().compose_node(parent, index)


# YAML 1.2 core schema for implicit scalars: only true/false booleans, no timestamps (a date stays a string).
_BoundedJsonYamlLoader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:merge")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_BoundedJsonYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


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
    try:
        document = yaml.load(text, Loader=_BoundedJsonYamlLoader)
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
