"""Route matching by path prefix and method against real upstreams, sticky hashing that is the same in every
process, and authorization allow lists (service names, full SPIFFE IDs, ``*``)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

import meshlib
from harness import ROOT
from meshlib.discovery import StaticDiscovery
from meshlib.endpoints import Endpoint
from meshlib.policy.routing import choose
from meshlib.rules.model import Authorization, validate_rules
from meshlib.security.authz import decide
from meshlib.security.spiffe import SpiffeId

pytestmark = pytest.mark.e2e  # its tests start processes (servers, a control plane, meshctl)

ROUTES = {
    "services": {
        "shop": {
            "subsets": {"v1": {"tags": ["v1"]}, "v2": {"tags": ["v2"]}},
            "routes": [
                {"match": {"path_prefix": "/api/"}, "to": [{"subset": "v2"}]},
                {"match": {"methods": ["POST", "put"]}, "to": [{"subset": "v2"}]},
                {"to": [{"subset": "v1"}]},
            ],
        }
    }
}


def test_path_prefix_and_methods_route_real_requests(upstreams):
    v1, v2 = upstreams(2)
    endpoints = [Endpoint("127.0.0.1", v1.port, frozenset({"v1"})), Endpoint("127.0.0.1", v2.port, frozenset({"v2"}))]
    mesh = meshlib.Mesh(service="web", discovery=StaticDiscovery({"shop": endpoints}), control_plane="")
    mesh.apply_rules(validate_rules(ROUTES, 1))
    with mesh, mesh.client() as client:

        def where(method: str, path: str) -> str:
            return str(client.request(method, f"http://shop{path}").json()["instance"])

        assert where("GET", "/api/items") == v2.name  # prefix
        assert where("GET", "/apix") == v1.name  # a prefix of the path, not of the string "/api"
        assert where("GET", "/") == v1.name
        assert where("POST", "/cart") == v2.name  # method
        assert where("PUT", "/cart") == v2.name  # methods are matched upper-cased
        assert where("DELETE", "/cart") == v1.name
        assert client.head("http://shop/api/x").status_code == 200  # no body: the counts below tell where it went
    assert v2.counts() == {"GET": 1, "POST": 1, "PUT": 1, "HEAD": 1}
    assert v1.counts() == {"GET": 2, "DELETE": 1}


def test_metrics_and_spans_call_a_route_by_its_name(upstreams):
    """The dashboard and Prometheus used to show ``route[0]``: a route's ``name`` is what they say now."""
    v1, v2 = upstreams(2)
    endpoints = [Endpoint("127.0.0.1", v1.port, frozenset({"v1"})), Endpoint("127.0.0.1", v2.port, frozenset({"v2"}))]
    named = json.loads(json.dumps(ROUTES))
    named["services"]["shop"]["routes"][0]["name"] = "api"
    named["services"]["shop"]["routes"][1]["name"] = "writes"
    mesh = meshlib.Mesh(service="web", discovery=StaticDiscovery({"shop": endpoints}), control_plane="")
    mesh.apply_rules(validate_rules(named, 1))
    with mesh, mesh.client() as client:
        for method, path in (("GET", "/api/items"), ("POST", "/cart"), ("GET", "/")):
            assert client.request(method, f"http://shop{path}").status_code == 200
        assert mesh.telemetry is not None
        metrics = mesh.telemetry.metrics.prometheus()
    routes = {line.split('mesh_route="')[1].split('"')[0] for line in metrics.splitlines() if 'mesh_route="' in line}
    assert routes == {"api", "writes", "route[2]"}  # the unnamed one goes by its position, as before


@pytest.mark.parametrize(
    ("names", "where", "error"),
    [
        (["API", None], 0, "expected lowercase letters"),
        (["default", None], 0, "not 'default'"),
        (["canary", "canary"], 1, "'canary' already names routes[0]"),
        ([7, None], 0, "expected lowercase letters"),
    ],
)
def test_route_names_are_label_safe_and_unique(names, where, error):
    from meshlib.rules.model import RulesValidationError

    doc = json.loads(json.dumps(ROUTES))
    for route, name in zip(doc["services"]["shop"]["routes"], names, strict=False):
        if name is not None:
            route["name"] = name
    with pytest.raises(RulesValidationError) as caught:
        validate_rules(doc)
    assert [e.path for e in caught.value.errors] == [f"services.shop.routes[{where}].name"]
    assert error in caught.value.errors[0].error


STICKY = {
    "services": {
        "shop": {
            "subsets": {"v1": {"tags": ["v1"]}, "v2": {"tags": ["v2"]}},
            "routes": [
                {
                    "to": [{"subset": "v1", "weight": 70}, {"subset": "v2", "weight": 30}],
                    "sticky": {"header": "x-user-id"},
                }
            ],
        }
    }
}
USERS = [f"user-{i}" for i in range(400)]


def _sticky_choices() -> list[str | None]:
    rules = validate_rules(STICKY).for_service("shop")
    assert rules is not None
    return [choose(rules, "GET", "/", {"x-user-id": u}.get, lambda: 0.0).subset for u in USERS]


def test_sticky_hashing_is_the_same_in_another_process():
    here = _sticky_choices()
    code = (
        "import json, sys; sys.path[:0] = ['tests/policy', 'tests'];"
        "from test_routing_rules import _sticky_choices; print(json.dumps(_sticky_choices()))"
    )
    # another interpreter, with another hash seed: Python's hash() would differ, the sticky hash must not
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"},
        cwd=str(_repo()),
    )
    assert json.loads(other.stdout) == here
    split = Counter(here)
    assert 0.6 < split["v1"] / len(USERS) < 0.8  # and the hash still honours the 70/30 weights
    rules = validate_rules(STICKY).for_service("shop")
    assert rules is not None
    # a user keeps its side whatever the random source says
    assert {choose(rules, "GET", "/", {"x-user-id": "user-7"}.get, lambda r=r: r).subset for r in (0.0, 0.5, 0.99)} == {
        here[7]
    }


def _repo():

    return ROOT


TD, NS = "mesh.local", "default"


@pytest.mark.parametrize(
    ("allow", "peer", "allowed"),
    [
        ({"billing"}, SpiffeId(TD, NS, "billing"), True),
        ({"billing"}, SpiffeId(TD, NS, "frontend"), False),
        ({"billing"}, SpiffeId(TD, "other", "billing"), False),  # a bare name means this namespace only
        ({"spiffe://mesh.local/ns/other/sa/billing"}, SpiffeId(TD, "other", "billing"), True),  # full ID: any ns
        ({"spiffe://mesh.local/ns/other/sa/billing"}, SpiffeId(TD, NS, "billing"), False),
        ({"*"}, SpiffeId(TD, "any", "anyone"), True),
        ({"*"}, None, False),  # "*" is any mesh identity, never plaintext
        ({"*"}, SpiffeId("evil.example", NS, "billing"), False),  # never another trust domain
        ({"spiffe://evil.example/ns/default/sa/billing"}, SpiffeId("evil.example", NS, "billing"), False),
    ],
)
def test_allow_lists(allow, peer, allowed):
    strict = decide(Authorization("strict", frozenset(allow)), peer, TD, NS)
    assert strict.allowed is allowed and strict.would_deny is False
    permissive = decide(Authorization("permissive", frozenset(allow)), peer, TD, NS)
    assert permissive.allowed is True and permissive.would_deny is (not allowed)
    assert decide(Authorization("off", frozenset(allow)), peer, TD, NS).allowed is True
