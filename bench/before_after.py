"""One bench script on two versions of meshlib, alternating (not a CI test): a refactor must leave the figures
where they were.

    python bench/before_after.py --before /tmp/old/src [--runs 3] -- bench/overhead.py --rounds 3

Each run of the script is one process on one version (``PYTHONPATH`` puts that version's ``src`` first), and runs
alternate before, after, before, after, ... so machine drift hits both alike. Every bench script here already
reports ratios against plain httpx / grpc measured side by side inside its own process; this prints each run's
lines that carry a ratio (an ``x`` figure), grouped by version, for comparison.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RATIO = re.compile(r"ratio|own work|adds|costs|\u00d7|\dx\b", re.IGNORECASE)


def run(src: Path, script: list[str]) -> list[str]:
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, *script], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    return [line for line in out.stdout.splitlines() if RATIO.search(line)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", required=True, type=Path, help="the src/ folder of the version to compare with")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("script", nargs=argparse.REMAINDER, help="-- then the bench script and its arguments")
    args = parser.parse_args()
    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    versions = {"before": args.before.resolve(), "after": ROOT / "src"}
    seen: dict[str, list[list[str]]] = {name: [] for name in versions}
    for i in range(args.runs):
        for name, src in versions.items():
            print(f"run {i + 1}/{args.runs}: {name} ({src})", file=sys.stderr, flush=True)
            seen[name].append(run(src, script))
    for name, runs in seen.items():
        print(f"== {name}")
        for number, lines in enumerate(runs, 1):
            for line in lines:
                print(f"  [{number}] {line}")


if __name__ == "__main__":
    main()
