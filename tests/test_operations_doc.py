"""docs/operations.md's manifests are what an operator pastes: every YAML block parses, every ``MESH_*`` variable
in it is one meshlib reads, every instance setting in a manifest passes meshlib's own validation, and every
``meshctl`` command line in a manifest is one meshctl's parser accepts. A renamed flag or variable turns this red
before it turns an operator's rollout red."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshlib.cli import build_parser
from meshlib.settings import TOOL_ENV, MeshSettings

DOC = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
KNOWN_VARIABLES = set(MeshSettings._ENV.values()) | set(TOOL_ENV.values())


def _blocks() -> list[Any]:
    text = DOC.read_text()
    found = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    assert found, "docs/operations.md has no yaml blocks"
    return [document for block in found for document in yaml.safe_load_all(block)]


def _containers(document: Any) -> list[dict[str, Any]]:
    if not isinstance(document, dict) or document.get("kind") not in ("Deployment", "StatefulSet"):
        return []
    containers = document["spec"]["template"]["spec"]["containers"]
    assert isinstance(containers, list)
    return containers


def test_every_variable_the_chapter_names_is_one_meshlib_reads() -> None:
    named = set(re.findall(r"\bMESH_[A-Z_]+\b", DOC.read_text()))
    assert named, "the chapter names no MESH_ variable"
    assert named <= KNOWN_VARIABLES, f"not meshlib settings: {sorted(named - KNOWN_VARIABLES)}"


def test_the_manifests_parse_and_their_commands_are_meshctl_commands() -> None:
    containers = [c for document in _blocks() for c in _containers(document)]
    assert len(containers) == 3, "expected the instance's, the control plane's and the replicas' manifests"
    parser = build_parser()
    for container in containers:
        command = [str(part) for part in container["command"]]
        assert command[0] == "meshctl"
        try:
            parser.parse_args(command[1:])
        except SystemExit:
            pytest.fail(f"meshctl refuses the command in docs/operations.md: {' '.join(command)}")


def test_the_instance_manifest_is_a_valid_mesh_configuration(tmp_path: Path) -> None:
    deployment = next(d for d in _blocks() if any(c["command"][1] == "run" for c in _containers(d)))
    instance = _containers(deployment)[0]
    env = {item["name"]: item.get("value", "from-a-secret") for item in instance["env"]}
    env["MESH_CONTROL_PLANE_CA"] = str(tmp_path / "ca-roots.pem")  # the mounted ConfigMap, here a real file
    (tmp_path / "ca-roots.pem").write_text("PEM\n")
    env["MESH_STATE_DIR"] = str(tmp_path / "state")
    settings = MeshSettings.from_env(env)
    assert settings.service == "orders" and settings.tls == "strict"
    assert settings.discovery == "registry://mesh-control-plane:7400"
    probe_ports = {instance["readinessProbe"]["tcpSocket"]["port"], instance["livenessProbe"]["tcpSocket"]["port"]}
    assert probe_ports == {instance["ports"][0]["containerPort"]}
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 30  # above graceful_timeout
