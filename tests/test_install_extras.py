"""Each install extra on its own, in a fresh venv: ``pip install 'meshlib[grpc]'`` alone serves and calls gRPC,
``meshlib`` alone calls HTTP, each framework's glue serves with only its framework installed. The scripts in
``smoke/`` check what is installed before they run, so an extra that starts needing another's package fails here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
SMOKE = Path(__file__).resolve().parent / "smoke"

EXTRAS = {
    "": "base_only.py",
    "grpc": "grpc_only.py",
    "flask": "flask_only.py",
    "fastapi": "fastapi_only.py",
    "django": "django_only.py",
    "consul": "consul_only.py",
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("extra", list(EXTRAS), ids=[e or "meshlib" for e in EXTRAS])
def test_one_extra_alone_in_a_fresh_venv(extra: str, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    spec = f"{ROOT}[{extra}]" if extra else str(ROOT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "PYTHON"))}
    env["MESH_STATE_DIR"] = str(tmp_path / "state")
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e", spec],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    ran = subprocess.run(
        [str(python), str(SMOKE / EXTRAS[extra])], capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path
    )
    assert ran.returncode == 0, (ran.stdout + ran.stderr)[-3000:]
    assert "smoke: ok" in ran.stdout
