"""Each install extra on its own, in a fresh venv: ``pip install 'meshlib[grpc]'`` alone serves and calls gRPC,
``meshlib`` alone calls HTTP, each framework's glue serves with only its framework installed. The scripts in
``smoke/`` check what is installed before they run, so an extra that starts needing another's package fails here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import ROOT

pytestmark = pytest.mark.e2e

SMOKE = Path(__file__).resolve().parent / "smoke"

EXTRAS = {
    "": "base_only.py",
    "grpc": "grpc_only.py",
    "flask": "flask_only.py",
    "fastapi": "fastapi_only.py",
    "django": "django_only.py",
    "consul": "consul_only.py",
}


def _env(state: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "PYTHON"))}
    env["MESH_STATE_DIR"] = str(state)
    return env


def _pip_install(venv: Path, spec: str, env: dict[str, str]) -> None:
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e", spec],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install meshlib`` alone, once; each extra starts from a copy of it (what pip would install first
    anyway), so only the extra's own packages are installed per test."""
    venv = tmp_path_factory.mktemp("base") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    _pip_install(venv, str(ROOT), _env(venv.parent / "state"))
    return venv


@pytest.mark.timeout(300)
@pytest.mark.parametrize("extra", list(EXTRAS), ids=[e or "meshlib" for e in EXTRAS])
def test_one_extra_alone_in_a_fresh_venv(extra: str, base_venv: Path, tmp_path: Path) -> None:
    env = _env(tmp_path / "state")
    venv = base_venv
    if extra:
        venv = tmp_path / "venv"
        shutil.copytree(base_venv, venv, symlinks=True)
        _pip_install(venv, f"{ROOT}[{extra}]", env)
    ran = subprocess.run(
        [str(venv / "bin" / "python"), str(SMOKE / EXTRAS[extra])],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=tmp_path,
    )
    assert ran.returncode == 0, (ran.stdout + ran.stderr)[-3000:]
    assert "smoke: ok" in ran.stdout
