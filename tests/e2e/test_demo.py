"""``meshctl demo`` end to end, as the README's first command runs it (plain output, for scripts)."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_runs_every_scene_and_passes(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "meshlib.cli", "demo", "--duration", "30", "--no-ui"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "8 of 8 scenes passed" in out
    for scene in (
        "baseline",
        "canary 5%",
        "canary 50%",
        "canary 100%",
        "instance killed",
        "broken instance",
        "control plane down",
    ):
        assert re.search(rf"PASS\s+{re.escape(scene)}:", out), scene
    assert "Traceback" not in out + result.stderr
    assert re.search(r"dashboard: http://127\.0\.0\.1:\d+/ui", out)
    # after the control plane came back, the instances' reports rebuilt the topology it shows
    dashboard = re.search(r"dashboard: (\d+) services, (\d+) edges \((.*)\)", out)
    assert dashboard, out
    assert "frontend->catalog" in dashboard.group(3) and "catalog->inventory" in dashboard.group(3)
    # the dashboard's payments page: both healthy v2 instances share the v2 traffic (none starves)
    shares = re.search(
        r"dashboard: payments v2 instances: payments-v2-1 [\d.]+ req/s \((\d+)%\), "
        r"payments-v2-2 [\d.]+ req/s \((\d+)%\)",
        out,
    )
    assert shares, out
    assert all(int(s) >= 25 for s in shares.groups()), shares.group(0)
