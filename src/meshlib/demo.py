"""``meshctl demo``: a whole mesh on this machine — the control plane with its embedded registry, the example shop
(frontend → catalog → inventory over gRPC, checkout → payments v1/v2), live traffic, and scenes that each check
what they show.

Everything runs as real processes on loopback; nothing but this package and its examples is needed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .demo_live import dashboard_back, interrupt, start_live
from .demo_samples import Sample, summarize
from .demo_scenes import demo_rules, demo_scenes_for
from .errors import MeshError
from .settings import env_value

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Child:
    name: str
    service: str
    proc: subprocess.Popen[bytes]
    port: int

    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class SceneResult:
    name: str
    expectation: str
    passed: bool
    detail: str


@dataclass
class Traffic:
    """Load from a meshed client to the frontend; keeps recent samples for the live view and the checks."""

    client: Any
    samples: deque[Sample] = field(default_factory=lambda: deque(maxlen=200_000))
    stop: threading.Event = field(default_factory=threading.Event)
    errors: Counter[str] = field(default_factory=Counter)

    def worker(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                r = self.client.post("http://frontend/buy")
                ok = r.status_code == 200
                version = r.json().get("payments_version") if ok else None
                if not ok:
                    self.errors[f"HTTP {r.status_code}: {r.text[:120]}"] += 1
            except Exception as exc:
                ok, version = False, None
                self.errors[f"{type(exc).__name__}: {str(exc)[:400]}"] += 1
            self.samples.append(Sample(time.monotonic(), ok, time.monotonic() - started, version))

    def window(self, since: float) -> list[Sample]:
        return [s for s in list(self.samples) if s.at >= since]


class Demo:
    def __init__(self, duration: float, ui: bool) -> None:
        self.duration = duration
        self.ui = ui
        self.tmp = Path(tempfile.mkdtemp(prefix="meshlib-demo-"))
        self.token = secrets.token_urlsafe(16)
        #: One join token per service (meshctl token create), so each instance can be only its own service.
        self.join_tokens: dict[str, str] = {}
        self.cp_port = _free_port()
        self.cp_url = f"http://127.0.0.1:{self.cp_port}"
        self.children: list[Child] = []
        self.control_plane: subprocess.Popen[bytes] | None = None
        self.results: list[SceneResult] = []
        self.scene = "starting"
        self.log_lines: deque[str] = deque(maxlen=8)
        self.mesh: Any = None
        self.signal_rows: list[Any] = []
        self.intruder: dict[str, Any] = {}
        self._last_scrape: tuple[float, dict[str, Any]] | None = None

    def golden_signals(self) -> list[Any]:
        """Per-service rate, success and latency since the previous call, from every instance's metrics."""
        from .telemetry import signals

        if self.mesh is None or self.mesh.identity is None:
            return []
        per_instance, _ = signals.scrape_each(self.instances(), self.mesh.identity.client, timeout=1.0)
        now = time.monotonic()
        previous = self._last_scrape
        self._last_scrape = (now, per_instance)
        if previous is None:
            return []
        # per instance: a killed instance's counts leaving the sum is not negative traffic
        return signals.between({}, signals.per_instance_delta(previous[1], per_instance), now - previous[0])

    # -- processes --------------------------------------------------------------------------------

    def join_token(self, service: str) -> str:
        """The join token of ``service``, created through the control plane's API on first use."""
        if service not in self.join_tokens:
            r = httpx.post(
                self.cp_url + "/v1/tokens",
                json={"services": [service], "description": "meshctl demo"},
                headers={"authorization": f"Bearer {self.token}"},
                timeout=10,
                trust_env=False,
            )
            r.raise_for_status()
            self.join_tokens[service] = str(r.json()["token"])
        return self.join_tokens[service]

    def env(self, name: str, service: str | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
        if service is not None:
            env["MESH_BOOTSTRAP_TOKEN"] = self.join_token(service)
        env.update(
            MESH_DISCOVERY=f"registry://127.0.0.1:{self.cp_port}",
            MESH_CONTROL_PLANE=self.cp_url,
            MESH_TLS="strict",
            MESH_STATE_DIR=str(self.tmp / "state" / name),
            DEMO_INSTANCE=name,
            PYTHONPATH=os.pathsep.join(
                [str(EXAMPLES / "fastapi_app"), str(EXAMPLES / "flask_app"), str(EXAMPLES / "grpc_app")]
            ),
        )
        return env

    def start_control_plane(self) -> None:
        env = self.env("control-plane")
        env["MESH_ADMIN_TOKEN"] = self.token
        self.control_plane = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meshlib.cli",
                "serve",
                "--port",
                str(self.cp_port),
                "--state-dir",
                str(self.tmp / "control-plane"),
                "--log-level",
                "warning",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.wait(lambda: self._get("/healthz") is not None, 30, "the control plane to start")

    def start(self, name: str, service: str, app: str, tags: str = "", **extra_env: str) -> Child:
        """``app`` is ``module:app`` for ``meshctl run``, or a script path (a gRPC server reading ``PORT``)."""
        port = _free_port()
        env = {**self.env(name, service), **extra_env, "PORT": str(port)}
        if app.endswith(".py"):
            cmd = [sys.executable, app]
        else:
            cmd = [sys.executable, "-m", "meshlib.cli", "run", service, app, "--port", str(port)]
        if tags:
            cmd += ["--tags", tags]
        logs = self.tmp / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / f"{name}.log", "wb") as log_file:  # the child keeps its own descriptor
            proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        child = Child(name, service, proc, port)
        self.children.append(child)
        return child

    def instances(self) -> list[dict[str, Any]]:
        body = self._get("/v1/registry/services")
        return [i for items in (body or {}).get("services", {}).values() for i in items]

    def registered(self, service: str) -> set[int]:
        body = self._get(f"/v1/registry/services/{service}")
        return {i["port"] for i in body["instances"]} if body else set()

    def _get(self, path: str) -> Any:
        try:
            r = httpx.get(self.cp_url + path, timeout=2, trust_env=False)
            return r.json() if r.status_code == 200 else None
        except httpx.HTTPError:
            return None

    def apply_rules(self, rules: dict[str, Any]) -> int:
        r = httpx.put(
            self.cp_url + "/v1/rules",
            json=rules,
            headers={"authorization": f"Bearer {self.token}"},
            timeout=5,
            trust_env=False,
        )
        r.raise_for_status()
        return int(r.json()["version"])

    @staticmethod
    def wait(condition: Callable[[], Any], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.05)

    def shutdown(self) -> None:
        procs = [c.proc for c in self.children] + ([self.control_plane] if self.control_plane else [])
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        if env_value("demo_keep"):
            print(f"demo files kept in {self.tmp}", file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- output -----------------------------------------------------------------------------------

    def say(self, line: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        self.log_lines.append(f"{stamp} {line}")
        if not self.ui:
            print(f"{stamp} {line}", flush=True)


def _generate_grpc_code() -> None:
    """inventory's gRPC code, generated once here so that its instances and catalog's do not race to make it."""
    sys.path.insert(0, str(EXAMPLES / "grpc_app"))
    try:
        import stubs  # type: ignore[import-not-found]  # the example's own generator (grpcio-tools)

        stubs.ensure_generated()
    finally:
        sys.path.remove(str(EXAMPLES / "grpc_app"))


def run_demo(duration: float = 60.0, ui: bool = True, stay: bool = False) -> int:
    if not (EXAMPLES / "fastapi_app" / "payments.py").exists():
        print(
            "meshctl demo: the example apps are not here; run it from a source checkout of meshlib "
            f"(looked in {EXAMPLES})",
            file=sys.stderr,
        )
        return 2
    import logging

    # The demo narrates failures itself; the library's own warnings about them (a watch losing the control plane
    # it was just told was killed) would only repeat that.
    logging.getLogger("meshlib").setLevel(logging.ERROR)
    demo = Demo(duration, ui)
    live = None
    traffic_errors: Counter[str] = Counter()
    try:
        demo.say("starting the control plane (rules + embedded registry)")
        demo.start_control_plane()
        demo.say(f"dashboard: {demo.cp_url}/ui (live while the scenes run; admin token for rollback: {demo.token})")
        demo.apply_rules(demo_rules(0))
        demo.say(
            "starting the shop (mTLS strict, authorization by identity): 2x frontend (Flask), 2x catalog, "
            "2x inventory (gRPC), 2x checkout, payments 2x v1 + 2x v2"
        )
        _generate_grpc_code()
        for i in (1, 2):
            demo.start(f"inventory-{i}", "inventory", str(EXAMPLES / "grpc_app" / "server.py"))
            demo.start(f"catalog-{i}", "catalog", "catalog:app")
            demo.start(f"checkout-{i}", "checkout", "checkout:app")
            demo.start(f"payments-v1-{i}", "payments", "payments:app", tags="v1", PAYMENTS_VERSION="v1")
            demo.start(f"payments-v2-{i}", "payments", "payments:app", tags="v2", PAYMENTS_VERSION="v2")
            demo.start(f"frontend-{i}", "frontend", "frontend:app")
        expected = {"catalog": 2, "inventory": 2, "checkout": 2, "payments": 4, "frontend": 2}
        demo.wait(lambda: all(len(demo.registered(s)) == n for s, n in expected.items()), 60, "every instance")
        demo.say(f"all {sum(expected.values())} instances registered")

        import meshlib

        os.environ["MESH_BOOTSTRAP_TOKEN"] = demo.join_token("loadgen")  # this process's meshes get identities too
        mesh = meshlib.Mesh(
            service="loadgen",
            discovery=f"registry://127.0.0.1:{demo.cp_port}",
            control_plane=demo.cp_url,
            tls="strict",
            state_dir=str(demo.tmp / "state" / "loadgen"),
        )
        demo.mesh = mesh
        client = mesh.client(timeout=10)
        traffic = Traffic(client)
        workers = [threading.Thread(target=traffic.worker, daemon=True) for _ in range(4)]
        for w in workers:
            w.start()
        if ui:
            live = start_live(demo, traffic)
        scenes = demo_scenes_for(demo, traffic)
        per_scene = max(3.0, duration / len(scenes))
        for name, expectation, action, check in scenes:
            demo.scene = name
            demo.say(f"scene: {name} — expect {expectation}")
            action()
            started = time.monotonic()
            time.sleep(per_scene)
            stats = summarize(traffic.window(started + per_scene * 0.3), per_scene * 0.7)
            passed, detail = check(stats, traffic.window(started))
            demo.results.append(SceneResult(name, expectation, passed, detail))
            demo.say(f"  {'PASS' if passed else 'FAIL'}: {detail}")
            if not ui:
                for row in demo.golden_signals():
                    demo.say(
                        f"    {row.service:9} {row.rate:6.1f} req/s  {row.success:7.1%} ok  "
                        f"p50 {row.p50_ms:6.1f} ms  p99 {row.p99_ms:6.1f} ms"
                    )
        dashboard_back(demo)
        if stay:
            demo.say(f"the mesh keeps running with traffic; dashboard at {demo.cp_url}/ui. Ctrl-C stops it.")
            signal.signal(signal.SIGTERM, interrupt)  # a stop from a process manager ends it as cleanly as Ctrl-C
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(1)
        traffic.stop.set()
        for w in workers:
            w.join(15)
        traffic_errors.update(traffic.errors)
        client.close()
        mesh.close()
    except KeyboardInterrupt:
        demo.say("interrupted")
        return 130
    except (RuntimeError, MeshError) as exc:
        demo.say(f"demo failed: {exc}")
        return 1
    finally:
        if live is not None:
            live.stop()
        demo.shutdown()
    failed = [r for r in demo.results if not r.passed]
    if failed and traffic_errors:
        print("errors seen by the traffic: " + ", ".join(f"{k} x{v}" for k, v in traffic_errors.most_common(5)))
    print(f"\nmeshctl demo: {len(demo.results) - len(failed)} of {len(demo.results)} scenes passed", flush=True)
    for r in demo.results:
        print(f"  {'PASS' if r.passed else 'FAIL'}  {r.name}: {r.detail}")
    return 1 if failed else 0
