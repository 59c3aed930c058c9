"""httpx's own test suite, run against meshlib's clients through mesh hops: the suite is the spec for a drop-in.

The sdist of the installed httpx version is fetched by pip at test time (never vendored) and its tests run twice in
subprocesses: with plain httpx, and with ``tests/httpx_suite/mesh_hops.py`` (``httpx.Client``/``AsyncClient`` are
meshlib's, and the suite's HTTP server is reached as the mesh service ``httpxsuite``), sync and async, asyncio and
trio. Every test that passes with plain httpx must pass through the mesh, except the exclusions below, each with
the reason a mesh hop cannot do what the test asks."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest

from harness import TESTS

HERE = TESTS

#: Tests a mesh hop cannot pass by design, with the reason.
EXCLUSIONS = {
    "tests.test_exceptions::test_httpcore_exception_mapping": (
        "asks for port 123456 of the server's host and expects ConnectError: a mesh hop goes to the instance "
        "discovery names, whatever port the URL carries"
    ),
}


def _fetch_suite(into: Path) -> Path:
    version = httpx.__version__
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-binary",
        ":all:",
        "--no-deps",
        f"httpx=={version}",
        "-d",
        str(into),
    ]
    for _ in range(3):  # a flaky network gets two more tries
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        archives = list(into.glob(f"httpx-{version}.tar.gz"))
        if archives:
            with tarfile.open(archives[0]) as tar:
                tar.extractall(into, filter="data")
            return into / f"httpx-{version}"
    pytest.fail(f"could not fetch httpx {version}'s sdist with {' '.join(command)}: {done.stderr[-500:]}")


def _run(suite: Path, junit: Path, *extra: str, env: dict[str, str] | None = None) -> dict[str, str]:
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-q",
        "-o",
        "addopts=",
        f"--junitxml={junit}",
        "tests",
        *extra,
    ]
    subprocess.run(command, cwd=suite, capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})})
    outcomes: dict[str, str] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        state = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                state = "failed"
            elif child.tag == "skipped":
                state = "skipped"
        outcomes[f"{case.get('classname')}::{case.get('name')}"] = state
    return outcomes


@pytest.mark.timeout(1500)
def test_httpx_s_own_suite_passes_through_mesh_hops(tmp_path):
    suite = _fetch_suite(tmp_path)
    plain = _run(suite, tmp_path / "plain.xml")
    report = tmp_path / "hops.txt"
    meshed = _run(
        suite,
        tmp_path / "mesh.xml",
        "-p",
        "mesh_hops",
        env={"PYTHONPATH": str(HERE / "httpx_suite"), "MESH_HOPS_REPORT": str(report)},
    )
    passed_plain = {name for name, state in plain.items() if state == "passed"}
    assert len(passed_plain) > 1000, f"httpx's suite barely ran with plain httpx: {len(passed_plain)} passed"
    # most of the suite runs on MockTransport or its TLS servers; its ~100 calls to the plain server are mesh hops
    assert int(report.read_text()) > 50, "the suite's calls did not go through the mesh hop"
    broken = sorted(name for name in passed_plain if meshed.get(name) != "passed" and name not in EXCLUSIONS)
    assert not broken, f"{len(broken)} of httpx's tests pass with httpx and fail with meshlib: {broken}"
