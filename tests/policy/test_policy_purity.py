"""The policy core stays pure: no module in ``meshlib/policy/`` imports an I/O library, a clock, or the rules
parser (rules/ depends on policy/, never the reverse). Read from the source, so an import added anywhere in a
module (also inside a function) is caught."""

from __future__ import annotations

import ast
from pathlib import Path

import meshlib.policy

FORBIDDEN = {"httpx", "httpcore", "grpc", "time", "datetime", "asyncio", "socket", "ssl", "anyio"}
POLICY = Path(meshlib.policy.__file__).parent


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            found.add(base)
    return found


def test_no_policy_module_imports_io_clocks_or_the_rules_parser():
    offences = []
    modules = sorted(POLICY.glob("*.py"))
    assert len(modules) >= 10, "the policy package was found"
    for path in modules:
        for name in imports_of(path):
            top = name.lstrip(".").split(".")[0]
            if (not name.startswith(".") and top in FORBIDDEN) or name.startswith("..rules"):
                offences.append(f"{path.name} imports {name}")
    assert offences == []


def test_the_check_sees_an_offending_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    import time\n    from ..rules.model import Rules\n")
    assert {"time", "..rules.model"} <= imports_of(bad)
