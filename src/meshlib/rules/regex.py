"""Linear-time regular expressions for header and path matches.

Rules come from the network, and a backtracking engine (Python's ``re``) can be frozen for minutes by a pattern
such as ``(a+)+b`` while it holds the GIL, so no call timeout can help. RE2 (Google's engine, which Envoy uses for
the same reason) runs in time linear in the input and refuses what it cannot do in linear time (backreferences,
lookaround). The validator and the client compile with this one function, so what validates is what runs.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

#: Longest pattern accepted; longer ones are refused before compiling.
MAX_PATTERN_LENGTH = 1024
#: RE2's memory budget for one compiled program: bounds the program size (and so the matching cost per byte).
MAX_PROGRAM_MEMORY = 1 << 20


class Pattern(Protocol):
    pattern: str

    def fullmatch(self, text: str) -> object | None: ...


class RegexError(ValueError):
    """The pattern is not acceptable; the message says why (too long, not RE2 syntax, too large)."""


@functools.cache
def _re2() -> tuple[Any, Any]:
    """RE2 and its options, loaded at the first pattern: about 3 MB of RSS a process with no regex rule never
    pays for."""
    import re2

    options = re2.Options()
    options.max_mem = MAX_PROGRAM_MEMORY
    options.log_errors = False
    return re2, options


def compile_regex(pattern: str) -> Pattern:
    """Compile ``pattern`` with RE2 and the limits above; RegexError with a reader's reason otherwise."""
    if not isinstance(pattern, str):
        raise RegexError(f"expected a string pattern, got {type(pattern).__name__}")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise RegexError(f"pattern is {len(pattern)} characters long; the limit is {MAX_PATTERN_LENGTH}")
    re2, options = _re2()
    try:
        compiled: Pattern = re2.compile(pattern, options)
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise RegexError(
            f"not a valid RE2 (linear-time) expression: {reason}; backreferences and lookaround are not supported"
        ) from None
    return compiled
