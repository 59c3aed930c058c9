"""The YAML loader for rules documents: PyYAML's SafeLoader composing only JSON-shaped trees (see
``document.py`` for why), loaded with the first document read."""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.events import AliasEvent, CollectionStartEvent

#: Deepest nesting, and most values, one document may hold.
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


class BoundedJsonYamlLoader(yaml.SafeLoader):
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
BoundedJsonYamlLoader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:merge")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
BoundedJsonYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
