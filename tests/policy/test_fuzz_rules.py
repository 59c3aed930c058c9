"""Property-based fuzz of the rules path: whatever text or data comes in, the parser and validator give a valid
document or a clean, path-naming error (a 400 at the control plane), never anything else."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshlib.errors import ConfigurationError
from meshlib.rules.model import Rules, RulesValidationError, parse_rules, validate_rules

pytestmark = pytest.mark.e2e  # its tests start processes (servers, a control plane, meshctl)

KEYS = [
    "services",
    "payments",
    "timeout",
    "retries",
    "attempts",
    "per_try_timeout",
    "on",
    "budget",
    "ratio",
    "min_per_second",
    "circuit_breaker",
    "consecutive_failures",
    "open_for",
    "load_balancer",
    "subsets",
    "tags",
    "meta",
    "routes",
    "match",
    "headers",
    "path_prefix",
    "methods",
    "to",
    "subset",
    "weight",
    "sticky",
    "header",
    "faults",
    "delay",
    "abort",
    "percent",
    "duration",
    "status",
    "authorization",
    "mode",
    "allow",
    "regex",
    "exact",
    "prefix",
    "retry_non_idempotent",
    "v1",
    "x-user",
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [
            "2s",
            "500ms",
            "1h",
            "99999999h",
            "0s",
            "-1s",
            "p2c_ewma",
            "strict",
            "(a+)+b",
            "(a)\\1",
            "*",
            "/api",
            "v1",
            "503",
            "connect-failure",
            "1" * 400 + "s",
        ]
    ),
    st.text(max_size=20),
)
DOCS = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(KEYS), children, max_size=5),
    max_leaves=40,
)


def _shaped(doc: object) -> object:
    """Most random documents die at the top level; put half of them where the schema looks."""
    return {"services": {"payments": doc}}


@settings(max_examples=400, deadline=None)
@given(doc=DOCS, shaped=st.booleans())
def test_validator_gives_rules_or_a_path_naming_error(doc, shaped):
    document = _shaped(doc) if shaped else doc
    try:
        rules = validate_rules(document)
    except RulesValidationError as exc:
        assert exc.errors and all(e.path and e.error for e in exc.errors)
        return
    assert isinstance(rules, Rules)
    json.dumps(rules.document, allow_nan=False)  # what is stored is plain, finite JSON


YAMLISH = st.text(alphabet=st.sampled_from(list("{}[]:,-&*!|>'\"#%@`?\n abc019.e")), max_size=200)


@settings(max_examples=400, deadline=None)
@given(text=YAMLISH | st.binary(max_size=100))
def test_parser_gives_json_data_or_a_configuration_error(text):
    try:
        document = parse_rules(text, "fuzz")
    except ConfigurationError as exc:
        assert str(exc)
        return
    json.dumps(document, allow_nan=False)


@pytest.fixture(scope="module")
def cp(tmp_path_factory):
    from harness import ControlPlaneProcess

    plane = ControlPlaneProcess(tmp_path_factory.mktemp("fuzz-cp"))
    yield plane
    plane.stop()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=DOCS.map(_shaped))
def test_control_plane_answers_only_200_or_400(cp, doc):
    r = httpx.put(cp.url + "/v1/rules", content=json.dumps(doc), headers=cp.admin(), timeout=30)
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert all(e["path"] and e["error"] for e in r.json()["errors"])
    else:
        stored = httpx.get(cp.url + f"/v1/rules/{r.json()['version']}", timeout=10)
        assert stored.status_code == 200


@pytest.mark.parametrize(
    ("meta", "expected"),
    [({"a": float("nan")}, "finite"), ({"a": {"x": [1]}}, "expected a string"), ({"a": ["lol"] * 9}, "string")],
)
def test_documents_from_code_or_caches_are_held_to_json_too(meta, expected):
    """Found by the fuzz above: meta values that are not strings (the alias bomb's payload sat there), and NaN
    from Python's json.loads (which accepts it), passed validation and then broke every JSON answer."""
    document = {
        "services": {
            "payments": {"subsets": {"v1": {"tags": ["v1"], "meta": meta}}, "routes": [{"to": [{"subset": "v1"}]}]}
        }
    }
    with pytest.raises(RulesValidationError, match=expected):
        validate_rules(document)
