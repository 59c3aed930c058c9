"""docs/quickstart.md, run as a person would paste it: its shell blocks from section 2 on, in order, in one bash
session from the repository's root, with free ports and a temporary directory instead of the fixed ones; the output
shown in the doc is compared loosely."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from harness import ROOT, free_port

DOC = ROOT / "docs" / "quickstart.md"


def shell_blocks(text: str) -> list[str]:
    body = text[text.index("## 2.") :]
    return re.findall(r"```sh\n(.*?)```", body, re.S)


def test_the_quickstart_runs_as_written(tmp_path):
    bin_dir = str(Path(sys.executable).parent)
    cp, p1, p2, c1 = free_port(), free_port(), free_port(), free_port()
    script = "\n".join(shell_blocks(DOC.read_text()))
    script = re.sub(r"(\.\./\.\./)?\.venv/bin/", lambda _: f"{bin_dir}/", script)
    for old, new in (
        ("/tmp/qs", str(tmp_path / "qs")),
        ("meshctl serve --state-dir", f"meshctl serve --port {cp} --state-dir"),
        ("8101", str(p1)),
        ("8102", str(p2)),
        ("8201", str(c1)),
    ):
        script = script.replace(old, new)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "CONSUL_", "OTEL_"))}
    env["MESH_CONTROL_PLANE"] = f"http://127.0.0.1:{cp}"  # the doc's default address, moved to a free port
    out_file, err_file = tmp_path / "stdout", tmp_path / "stderr"
    # files, not pipes (background jobs would hold a pipe open), and a session of its own, so that whatever the
    # script left running is stopped with it
    with out_file.open("w") as stdout, err_file.open("w") as stderr:
        proc = subprocess.Popen(
            ["bash", "-c", "set -e\n" + script], cwd=ROOT, env=env, stdout=stdout, stderr=stderr, start_new_session=True
        )
        try:
            returncode = proc.wait(timeout=110)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    out, err = out_file.read_text(), err_file.read_text()
    assert returncode == 0, out + err
    listening = [line for line in out.splitlines() if "listening on" in line]
    assert len(listening) == 3 and all("MESH_TLS=off" in line and "registered as" in line for line in listening), out
    assert f"registry at http://127.0.0.1:{cp}" in listening[0]
    lines = out.splitlines()
    first_calls = [line for line in lines if re.fullmatch(r"200 v[12]", line)]
    assert len(first_calls) >= 5, out  # four spread calls, then the canary one
    assert "rules version 1 applied" in lines and "rules version 2 applied" in lines
    canary = lines[lines.index("rules version 1 applied") + 1 :]
    assert canary[0] == "200 v2", out  # x-canary carried from checkout to payments
    tls = lines[lines.index("rules version 2 applied") + 1 :]
    assert tls[:2] == ["200", "403"], out
    # payments' history, made by its team's scoped token; that token cannot change checkout's rules
    history = [line.split() for line in tls[2:] if line.strip()[:1].isdigit()]
    assert [h[0] for h in history] == ["2*", "1"] and history[0][3] == "changed", out
    assert "(token " in out and "+    authorization:" in out and "-    routes:" in out
    assert "may change only the rules of its services, not checkout" in err
    assert "Traceback" not in err
