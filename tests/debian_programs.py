"""Programs from Debian's packages that tests run for real (Chromium, Prometheus): found on the PATH, or installed
on first use where the test run may install system packages (root with apt-get, as in CI). Otherwise the caller
skips, saying what to install."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from collections.abc import Sequence


def _found(candidates: Sequence[str]) -> str | None:
    for name in candidates:
        path = name if os.path.isabs(name) else shutil.which(name)
        if path and os.access(path, os.X_OK):
            return path
    return None


def debian_program(package: str, candidates: Sequence[str]) -> tuple[str | None, str]:
    """(path to the program, "") or (None, why not): ``candidates`` are absolute paths or names on the PATH."""
    path = _found(candidates)
    if path:
        return path, ""
    if not shutil.which("apt-get") or os.geteuid() != 0:
        return None, f"no {package} here: install Debian's {package} package (sudo apt-get install {package})"
    with open(f"/tmp/meshlib-{package}-install.lock", "w") as lock:  # one installer at a time (xdist workers)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _found(candidates) is None:
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]
            done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:  # a fresh machine may need the package lists first
                subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
                done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                return None, f"apt-get install {package} failed: {done.stderr.strip()[-300:]}"
    path = _found(candidates)
    return (path, "") if path else (None, f"apt-get installed {package}, but none of {list(candidates)} is there")
