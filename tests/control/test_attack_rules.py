"""Attack: hostile rules documents sent to a real ``meshctl serve``. Each is refused with a 400/413 that names the
problem, nothing is stored, the control plane keeps answering ``/healthz`` fast while it runs, and a rule that is
accepted cannot freeze the clients that evaluate it."""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

import meshlib
from harness import wait_for
from meshlib.discovery import StaticDiscovery
from meshlib.endpoints import Endpoint

pytestmark = pytest.mark.e2e  # its tests start processes (servers, a control plane, meshctl)

ALIAS_BOMB = """services:
  p:
    subsets:
      v1:
        tags: [v1]
        meta: {a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"],
               b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b],
               d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c], e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d],
               f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e], g: [*f,*f,*f,*f,*f,*f,*f,*f,*f]}
"""


class HealthProbe:
    """Polls /healthz from a thread while an attack runs, keeping every latency."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.wait(0.02):
                started = time.perf_counter()
                try:
                    ok = client.get(self.url + "/healthz").status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.latencies.append(time.perf_counter() - started)
                self.failures += not ok

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        wait_for(lambda: len(self.latencies) >= 5, what="a few /healthz probes")
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def cp(control_plane):
    return control_plane()


@pytest.fixture
def probe(cp) -> Iterator[HealthProbe]:
    with HealthProbe(cp.url) as p:
        yield p
    assert p.failures == 0
    # the control plane stays responsive while attacked: parsing runs off its event loop
    assert statistics.median(p.latencies) < 0.1, sorted(p.latencies)[-5:]


def put_text(cp, text: str | bytes, **headers: str) -> httpx.Response:
    return httpx.put(cp.url + "/v1/rules", content=text, headers={**cp.admin(), **headers}, timeout=60)


def current_version(cp) -> int:
    return int(httpx.get(cp.url + "/v1/rules").json()["version"])


def test_yaml_alias_bomb_is_refused_before_expansion(cp, probe):
    started = time.monotonic()
    r = put_text(cp, ALIAS_BOMB)
    assert r.status_code == 400
    assert "anchors" in r.json()["errors"][0]["error"] and "JSON" in r.json()["errors"][0]["error"]
    assert time.monotonic() - started < 5  # today: 43 s and 2.3 GB
    assert current_version(cp) == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("services: {p: {timeout: 1%sh}}" % ("0" * 400), "services.p.timeout"),
        ("services: {p: {timeout: 2h}}", "at most 1h"),
        ("services: {p: {faults: {delay: {duration: 99999999h}}}}", "services.p.faults.delay.duration"),
        ("services: {p: {timeout: .nan}}", "finite"),
        ("services: {p: {retries: {budget: {ratio: .inf}}}}", "finite"),
        ("services: {p: {timeout: 2001-01-01}}", "not a duration"),
        ("services: {p: !!set {a, b}}", "tag"),
        ("services: {p: !!binary aGVsbG8=}", "tag"),
        ("[" * 5000 + "]" * 5000, "nested deeper"),
        ('{"services": {"p": {"timeout": 1e400}}}', "services.p.timeout"),
        ('{"services": {"p": {"retries": {"budget": {"ratio": 1.0e+400}}}}}', "finite"),
        ("services: {p: {faults: {abort: {percent: 101}}}}", "between 0 and 100"),
        ("services: {p: {routes: [{match: {headers: {x: {regex: '(a)\\1'}}}, to: [{}]}]}}", "RE2"),
        ("services: {p: {routes: [{match: {headers: {x: {regex: '%s'}}}, to: [{}]}]}}" % ("a" * 2000), "limit"),
    ],
)
def test_hostile_values_are_a_400_naming_the_problem_and_nothing_is_stored(cp, text, expected):
    r = put_text(cp, text)
    assert r.status_code == 400, r.text
    assert expected in json.dumps(r.json()), r.json()
    assert current_version(cp) == 0


def test_oversized_bodies_get_413_without_being_read_whole(cp, probe):
    big = b"services: {}\n" + b"#" * (2 << 20)
    r = put_text(cp, big)
    assert r.status_code == 413 and "limit" in r.json()["error"]

    sent = 0

    def stream() -> Iterator[bytes]:  # no Content-Length: the server must stop reading on its own
        nonlocal sent
        chunk = b"#" * 65536
        for _ in range(800):  # 50 MiB if it were all read
            sent += len(chunk)
            yield chunk

    try:
        r = httpx.put(cp.url + "/v1/rules", content=stream(), headers=cp.admin(), timeout=30)
        assert r.status_code == 413
    except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
        pass  # the server answered 413 and closed while we were still sending: also a refusal
    assert sent < 50 << 20  # it stopped us well before the end
    assert current_version(cp) == 0


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v1/rules/history?limit=1e20", 400),
        ("/v1/rules/history?limit=" + "9" * 400, 400),
        ("/v1/rules/1e23", 404),
        ("/v1/rules/" + "9" * 400, 404),
        ("/v1/rules?index=" + "9" * 400, 400),
        ("/v1/rules?index=0&wait=" + "9" * 400 + "h", 400),
        ("/v1/registry/services/" + "x" * 300, 400),
        ("/v1/registry/services/BAD_NAME", 400),
    ],
)
def test_bad_queries_are_4xx_not_500(cp, path, status):
    r = httpx.get(cp.url + path, timeout=10)
    assert r.status_code == status, r.text
    assert "error" in r.json()


def test_accepted_regex_cannot_freeze_a_client(cp, upstreams):
    """``(a+)+b`` is valid RE2 and is accepted; evaluating it on ``aaaa…!`` must stay linear. With Python's re,
    40 characters take longer than the age of the universe."""
    upstream = upstreams(1)[0]
    beta_route = {"match": {"headers": {"x-user": {"regex": "(a+)+b"}}}, "to": [{"subset": "v1"}]}
    v = cp.apply({"services": {"echo": {"subsets": {"v1": {"tags": ["v1"]}}, "routes": [beta_route, {"to": [{}]}]}}})
    mesh = meshlib.Mesh(
        service="victim",
        discovery=StaticDiscovery({"echo": [Endpoint("127.0.0.1", upstream.port)]}),
        control_plane=cp.url,
    )
    result: list[int] = []
    with mesh, mesh.client() as client:
        assert mesh.rules_watcher is not None and mesh.rules_watcher.wait_for_version(v, 10)

        def call() -> None:
            result.append(client.get("http://echo/x", headers={"x-user": "a" * 5000 + "!"}).status_code)

        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        worker.join(10)
        assert result == [200]  # answered (by the default route), not frozen
    wait_for(lambda: upstream.counts().get("GET") == 1, what="the request to arrive")
