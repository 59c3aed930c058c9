"""A real headless Chromium for the dashboard tests: Debian's ``chromium`` package, driven by Playwright's Python
package (its bundled driver, never its browser download). Installed on first use where the test run may install
system packages (root with apt-get, as in CI); otherwise the tests skip and say what to install."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
#: As Chromium must run here: no sandbox as root, and no background connections to Google's hosts (refused here).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def _found() -> str | None:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def chromium() -> tuple[str | None, str]:
    """(path to Chromium, or None with the reason)."""
    path = _found()
    if path:
        return path, ""
    if not shutil.which("apt-get") or os.geteuid() != 0:
        return None, "no Chromium here: install Debian's chromium package (sudo apt-get install chromium)"
    with open("/tmp/meshlib-chromium-install.lock", "w") as lock:  # one installer at a time (xdist workers)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _found() is None:
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
            done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:  # a fresh machine may need the package lists first
                subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
                done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                return None, f"apt-get install chromium failed: {done.stderr.strip()[-300:]}"
    path = _found()
    return (path, "") if path else (None, "apt-get installed chromium, but no chromium binary was found")
