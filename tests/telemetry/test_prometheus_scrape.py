"""A real Prometheus (Debian's package) finds every instance through the control plane's
``/v1/prometheus/targets`` and scrapes them, strict-mTLS ones included, with the one job docs/observability.md
gives: a client certificate from ``meshctl ca issue`` and ``server_name: metrics.mesh``. Before, strict instances
needed a scrape job per service (Prometheus has one ``server_name`` per job) and there was no discovery at all."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from debian_programs import debian_program
from harness import Upstream, free_port, wait_for

pytestmark = pytest.mark.e2e  # its tests start processes

BOOT = "prometheus-boot-token"

SCRAPE_CONFIG = """
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: mesh
    http_sd_configs:
      - url: {control_plane}/v1/prometheus/targets
        refresh_interval: 1s
    tls_config:
      ca_file: {certs}/ca.crt
      cert_file: {certs}/prometheus.crt
      key_file: {certs}/prometheus.key
      server_name: metrics.mesh
    relabel_configs:
      - source_labels: [__meta_mesh_service]
        target_label: service
"""


@pytest.fixture
def prometheus_binary() -> str:
    path, why = debian_program("prometheus", ("/usr/bin/prometheus", "prometheus"))
    if path is None:
        pytest.skip(why)
    return path


@pytest.fixture
def instances(control_plane: Any, tmp_path: Path) -> Iterator[tuple[Any, Upstream, Upstream]]:
    cp = control_plane(bootstrap_token=BOOT)
    base = {"MESH_CONTROL_PLANE": cp.url, "MESH_STATS_INTERVAL": "0", "MESH_BOOTSTRAP_TOKEN": BOOT}
    strict = Upstream(
        "ledger-1",
        mesh_service="ledger",
        env={**base, "MESH_TLS": "strict", "MESH_STATE_DIR": str(tmp_path / "l")},
    )
    plain = Upstream("catalog-1", mesh_service="catalog", env={**base, "MESH_STATE_DIR": str(tmp_path / "c")})
    try:
        strict.wait_listening()
        plain.wait_listening()
        yield cp, strict, plain
    finally:
        strict.stop()
        plain.stop()


def test_the_targets_say_where_and_how_to_scrape(instances: tuple[Any, Upstream, Upstream]) -> None:
    cp, strict, plain = instances

    def groups() -> list[dict[str, Any]]:
        found = httpx.get(cp.url + "/v1/prometheus/targets", timeout=5).json()
        return found if len(found) == 2 else []

    by_service = {g["labels"]["__meta_mesh_service"]: g for g in wait_for(groups, timeout=30, what="two targets")}
    assert by_service["ledger"]["targets"] == [f"127.0.0.1:{strict.port}"]
    assert by_service["catalog"]["targets"] == [f"127.0.0.1:{plain.port}"]
    assert by_service["ledger"]["labels"]["__scheme__"] == "https"  # strict takes nothing else
    assert by_service["catalog"]["labels"]["__scheme__"] == "http"
    assert {g["labels"]["__metrics_path__"] for g in by_service.values()} == {"/-/mesh/metrics"}
    only = httpx.get(cp.url + "/v1/prometheus/targets", params={"service": "catalog"}, timeout=5).json()
    assert [g["labels"]["__meta_mesh_service"] for g in only] == ["catalog"]
    bad = httpx.get(cp.url + "/v1/prometheus/targets", params={"service": "../x"}, timeout=5)
    assert bad.status_code == 400 and "not a service name" in bad.json()["error"]


@pytest.mark.timeout(420)  # a first run apt-installs Prometheus
def test_prometheus_discovers_and_scrapes_strict_and_plaintext_instances(
    instances: tuple[Any, Upstream, Upstream], prometheus_binary: str, tmp_path: Path
) -> None:
    cp, strict, plain = instances
    certs = tmp_path / "certs"
    issue = [sys.executable, "-m", "meshlib.cli", "ca", "issue", "prometheus", "--state-dir", str(cp.state_dir)]
    issued = subprocess.run(
        [*issue, "--lifetime", "1h", "--out-dir", str(certs)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert issued.returncode == 0, issued.stderr
    config = tmp_path / "prometheus.yml"
    config.write_text(SCRAPE_CONFIG.format(control_plane=cp.url, certs=certs))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    serve = [prometheus_binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}"]
    proc = subprocess.Popen(
        [*serve, f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{port}/api/v1"

    def targets_up() -> dict[str, dict[str, Any]]:
        try:
            active = httpx.get(api + "/targets", timeout=2).json()["data"]["activeTargets"]
        except (httpx.HTTPError, ValueError, KeyError):
            return {}
        seen = {t["labels"].get("service", ""): t for t in active}
        return seen if len(seen) == 2 and all(t["health"] == "up" for t in seen.values()) else {}

    try:
        for _ in range(3):  # a request each, so each serves a request histogram
            assert httpx.get(plain.url + "/hello", timeout=5).status_code == 200
        try:
            up = wait_for(targets_up, timeout=60, interval=0.5, what="Prometheus to scrape both instances")
        except AssertionError as exc:  # say why: each target's last error, and Prometheus' own log
            log.flush()
            tail = (tmp_path / "prometheus.log").read_text()[-2000:]
            raise AssertionError(f"{exc}: {_state(api)}\n{tail}") from None
        assert up["ledger"]["scrapeUrl"] == f"https://127.0.0.1:{strict.port}/-/mesh/metrics"
        assert up["catalog"]["scrapeUrl"] == f"http://127.0.0.1:{plain.port}/-/mesh/metrics"

        def value(query: str) -> float:
            found = httpx.get(api + "/query", params={"query": query}, timeout=2).json()["data"]["result"]
            return float(found[0]["value"][1]) if found else 0.0

        # what the instances serve, read: catalog's three requests, and the strict instance's certificate lifetime
        served = 'sum(http_server_request_duration_seconds_count{service="catalog"})'
        wait_for(lambda: value(served) >= 3, timeout=30, interval=0.5, what="catalog's requests in a query")
        assert 0 < value('{__name__=~"mesh_certificate_time_to_expiry.*", service="ledger"}') <= 7 * 86400
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _state(api: str) -> str:
    try:
        active = httpx.get(api + "/targets", timeout=2).json()["data"]["activeTargets"]
    except (httpx.HTTPError, ValueError, KeyError):
        return "(no answer from Prometheus)"
    return json.dumps([(t["scrapeUrl"], t["health"], t.get("lastError")) for t in active])
