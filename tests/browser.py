"""A real headless Chromium for the dashboard tests: Debian's ``chromium`` package, driven by Playwright's Python
package (its bundled driver, never its browser download), installed on first use as tests/debian_programs.py says."""

from __future__ import annotations

from pathlib import Path

from debian_programs import debian_program

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


def chromium() -> tuple[str | None, str]:
    """(path to Chromium, or None with the reason)."""
    return debian_program("chromium", ("/usr/bin/chromium", "chromium", "chromium-browser"))
