"""The dashboard in a real headless Chromium, against a live control plane with meshed services and traffic:

    loadgen (this process, a client-only mesh) -> frontend (1 instance) -> backend (2 instances)
    loadgen -> backend (a few direct calls: an edge that passes the frontend's column)

all in strict mTLS with certificates from the control plane's CA, reporting golden signals every 0.5 s."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

import meshlib
from browser import ARTIFACTS, CHROMIUM_ARGS, chromium
from harness import ControlPlaneProcess, Upstream, wait_for
from meshlib.settings import MeshSettings, registry_of

pytestmark = pytest.mark.timeout(600)  # the first test may install Chromium
BOOT = "dashboard-boot-token"


@dataclass
class LiveMesh:
    cp: ControlPlaneProcess
    backends: list[Upstream]
    frontend: Upstream
    mesh: meshlib.Mesh
    calls: list[int]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveMesh]:
    root = tmp_path_factory.mktemp("dashboard")
    cp = ControlPlaneProcess(root / "cp", bootstrap_token=BOOT)
    env = {
        "MESH_CONTROL_PLANE": cp.url,
        "MESH_BOOTSTRAP_TOKEN": BOOT,
        "MESH_TLS": "strict",
        "MESH_STATE_DIR": str(root / "state"),
        "MESH_STATS_INTERVAL": "0.5",
    }
    backends = [Upstream(f"b{i}", mesh_service="backend", env=env) for i in range(2)]
    frontend = Upstream("f0", mesh_service="frontend", env=env, extra_args=("--forward-to", "backend"))
    for u in [*backends, frontend]:
        u.wait_listening()
    settings = MeshSettings(
        service="loadgen",
        control_plane=cp.url,
        discovery=registry_of(cp.url),
        tls="strict",
        bootstrap_token=BOOT,
        state_dir=str(root / "loadgen"),
        stats_interval=0.5,
    ).validated()
    mesh = meshlib.Mesh(settings=settings)
    calls = [0]
    stop = threading.Event()

    def load() -> None:
        with mesh.client(timeout=5.0) as client:
            while not stop.is_set():
                try:
                    client.get("http://frontend/fwd/hello")
                    calls[0] += 1
                    if calls[0] % 10 == 0:
                        client.get("http://backend/hello")
                except httpx.HTTPError:
                    pass
                stop.wait(0.01)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:
        yield LiveMesh(cp, backends, frontend, mesh, calls)
    finally:
        stop.set()
        for u in [frontend, *backends]:  # all at once: each drains for a moment before it exits
            if u.proc.poll() is None:
                u.proc.terminate()
        thread.join(10)
        mesh.close()
        for u in [*backends, frontend]:
            u.stop()
        cp.stop()


@pytest.fixture(scope="module")
def page(live: LiveMesh) -> Iterator[Any]:
    path, reason = chromium()
    if path is None:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.errors = errors  # type: ignore[attr-defined]
        yield page
        browser.close()


def shot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"dashboard-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def no_overflow(page: Any) -> None:
    width = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], f"the page is {width[0]} px wide in a {width[1]} px window"


def edge_row(page: Any, source: str, destination: str) -> list[str] | None:
    rows = page.eval_on_selector_all(
        "#edges tbody tr", "rows => rows.map(r => Array.from(r.cells).map(c => c.textContent))"
    )
    return next((r for r in rows if r[0] == source and r[1] == destination), None)


def test_topology_shows_both_services_and_the_live_mtls_edge(live: LiveMesh, page: Any) -> None:
    page.goto(live.cp.url + "/")  # redirected to /ui
    assert page.url.endswith("/ui")

    def edge_with_traffic() -> list[str] | None:
        row = edge_row(page, "frontend", "backend")
        return row if row is not None and float(row[2]) > 0 else None

    row = wait_for(edge_with_traffic, timeout=30, interval=0.5, what="the frontend -> backend edge with traffic")
    assert row[6] == "yes"  # mTLS, with both identities
    assert "spiffe://mesh.local/ns/default/sa/frontend" in row[7]
    assert "spiffe://mesh.local/ns/default/sa/backend" in row[7]
    for service in ("frontend", "backend", "loadgen"):
        assert page.locator(f'svg#topology g.node[data-service="{service}"]').count() == 1
    assert page.locator('svg#topology path[data-edge="frontend->backend"]').count() == 1
    assert "2/2 instances up" in page.locator('g.node[data-service="backend"]').text_content()
    no_overflow(page)
    shot(page, "topology")
    assert not page.errors  # type: ignore[attr-defined]


NODE_BOXES = """() => Array.from(document.querySelectorAll("svg#topology g.node")).map(g => {
  const m = /translate\\(([-\\d.]+),([-\\d.]+)\\)/.exec(g.getAttribute("transform"));
  const r = g.querySelector("rect");
  return [g.dataset.service, +m[1], +m[2], +r.getAttribute("width"), +r.getAttribute("height")];
})"""
EDGE_POINTS = """() => Array.from(document.querySelectorAll("svg#topology path[data-edge]")).map(p => {
  const n = p.getTotalLength(), points = [];
  for (let i = 0; i <= 100; i++) { const q = p.getPointAtLength(n * i / 100); points.push([q.x, q.y]); }
  return [p.dataset.edge, points];
})"""


def test_no_edge_is_drawn_through_a_node(live: LiveMesh, page: Any) -> None:
    """loadgen -> backend passes the frontend's column: drawn straight, it ran through the frontend's node."""
    page.goto(live.cp.url + "/ui")
    page.wait_for_selector('svg#topology path[data-edge="loadgen->backend"]', state="attached", timeout=30_000)
    boxes = page.evaluate(NODE_BOXES)
    columns = sorted({x for _, x, _, _, _ in boxes})
    assert len(columns) == 3, boxes  # loadgen, frontend, backend: the edge does pass a column
    for edge, points in page.evaluate(EDGE_POINTS):
        ends = set(edge.split("->"))
        for name, x, y, w, h in boxes:
            if name in ends:
                continue
            inside = [(px, py) for px, py in points if x + 1 < px < x + w - 1 and y + 1 < py < y + h - 1]
            assert not inside, f"the edge {edge} runs through the {name} node at {inside[:3]}"
    shot(page, "topology-lanes")


def test_callers_refused_by_authorization_show_as_denied_not_as_success(live: LiveMesh, page: Any) -> None:
    """backend allows only frontend: loadgen's direct calls get 403, and the edge says so (it showed 100%)."""
    version = live.cp.apply({"services": {"backend": {"authorization": {"mode": "strict", "allow": ["frontend"]}}}})
    try:
        page.goto(live.cp.url + "/ui")

        def refused_edge() -> list[str] | None:
            row = edge_row(page, "loadgen", "backend")
            return row if row is not None and int(row[8]) > 0 and row[3] != "100%" else None

        wait_for(refused_edge, timeout=30, interval=0.5, what=f"loadgen -> backend denied (rules v{version})")
        label = page.locator("svg#topology text.label", has_text="denied").first.text_content() or ""
        assert "denied" in label
        frontend = edge_row(page, "frontend", "backend")
        assert frontend is not None and int(frontend[8]) == 0  # the allowed caller is untouched
    finally:
        live.cp.apply({"services": {}})


def test_service_page_lists_instances_routes_and_charts(live: LiveMesh, page: Any) -> None:
    page.goto(live.cp.url + "/ui#/service/backend")
    page.wait_for_selector("#service-name")
    wait_for(lambda: page.locator('[data-state="up"]').count() == 2, timeout=20, interval=0.3, what="2 instances up")
    text = page.locator("main").text_content()
    for u in live.backends:
        assert f"127.0.0.1:{u.port}" in text
    assert "Inbound, per caller and route" in text and "frontend" in text
    assert page.locator(".chart svg path").count() == 4
    # every rate on the page says over what it is measured: three bare "req/s" figures disagreed before
    figures = page.eval_on_selector_all(".figure", "fs => fs.map(f => f.firstChild.textContent)")
    assert figures and all(f.endswith("last 60 s") for f in figures), figures
    charts = page.eval_on_selector_all(".chart > div", "cs => cs.map(c => c.firstChild.textContent)")
    assert len(charts) == 4 and all("last 10 s" in c for c in charts), charts
    assert "inbound req/s, since its previous report" in text
    no_overflow(page)
    shot(page, "service")


def test_a_new_rules_version_shows_with_its_diff(live: LiveMesh, page: Any) -> None:
    first = live.cp.apply({"services": {"backend": {"timeout": "2s"}}})
    second = live.cp.apply({"services": {"backend": {"timeout": "3s", "retries": {"attempts": 2}}}})
    page.goto(live.cp.url + "/ui#/rules")
    wait_for(
        lambda: page.locator("#rules-current").text_content() == f"version {second}",
        timeout=10,
        interval=0.2,
        what="the current version",
    )
    diff = page.locator("#diff").text_content()
    assert f"--- version {first}" in diff and f"+++ version {second}" in diff
    assert '-      "timeout": "2s"' in diff and '+      "timeout": "3s"' in diff
    no_overflow(page)
    shot(page, "rules")


def test_rollback_needs_the_token_and_works_with_it(live: LiveMesh, page: Any) -> None:
    history = httpx.get(live.cp.url + "/v1/rules/history").json()
    current, target = history["current"], history["versions"][-1]["version"]
    page.goto(live.cp.url + "/ui#/rules")
    page.wait_for_selector(f'button.rollback[data-version="{target}"]')
    page.evaluate("() => sessionStorage.clear()")
    page.click(f'button.rollback[data-version="{target}"]')
    page.wait_for_selector("#rules-message")
    assert "refused" in page.locator("#rules-message").text_content()
    assert httpx.get(live.cp.url + "/v1/rules").json()["version"] == current  # nothing was written

    page.fill("#token", live.cp.admin_token or "")
    page.click("#token-save")
    assert page.locator("#token-state").text_content() == "token set (this tab only)"
    assert live.cp.admin_token not in page.content()  # the token is never put into the page
    page.click(f'button.rollback[data-version="{target}"]')
    wait_for(
        lambda: "Rolled back" in (page.locator("#rules-message").text_content() or ""),
        timeout=10,
        interval=0.2,
        what="the rollback message",
    )
    now = httpx.get(live.cp.url + "/v1/rules").json()
    assert now["version"] == current + 1
    assert now["rules"] == httpx.get(f"{live.cp.url}/v1/rules/{target}").json()["rules"]


def test_a_killed_instance_is_shown_gone_or_ejected_within_seconds(live: LiveMesh, page: Any) -> None:
    page.goto(live.cp.url + "/ui#/service/backend")
    wait_for(lambda: page.locator('[data-state="up"]').count() == 2, timeout=20, interval=0.3, what="2 instances up")
    victim = live.backends[0]
    killed_at = time.monotonic()
    victim.kill()

    def victim_state() -> str | None:
        rows = page.eval_on_selector_all(
            "main table tbody tr", "rows => rows.map(r => Array.from(r.cells).map(c => c.textContent))"
        )
        row = next((r for r in rows if r[1] == f"127.0.0.1:{victim.port}"), None)
        state = "absent" if row is None else row[4]
        return state if state in ("absent", "ejected", "silent", "gone") else None

    state = wait_for(victim_state, timeout=10, interval=0.2, what="the killed instance to show as down")
    took = time.monotonic() - killed_at
    shot(page, "killed")
    assert took < 10, f"took {took:.1f} s to show {state}"
