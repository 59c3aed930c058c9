"""Attack: malformed or absurd mesh headers sent to a real ``meshlib.serve``. A bad ``x-mesh-deadline`` is a 400
that names the header, a bad ``traceparent`` is ignored, and no deadline lies more than an hour ahead. Plus a
property-based fuzz of the inbound header handling: nothing but a clean answer, ever."""

from __future__ import annotations

import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import meshlib
from harness import Upstream
from meshlib.discovery import StaticDiscovery
from meshlib.inbound import admit
from meshlib.policy.deadline import MAX_INCOMING_DEADLINE, parse_deadline_header

pytestmark = pytest.mark.e2e  # its tests start processes (servers, a control plane, meshctl)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    state = tmp_path_factory.mktemp("inbound")
    env = {"MESH_DISCOVERY": "static:", "MESH_CONTROL_PLANE": "", "MESH_STATE_DIR": str(state)}
    upstream = Upstream("inbound", mesh_service="inbound", env=env).wait_listening()
    yield upstream
    upstream.stop()


@pytest.mark.parametrize(
    "value",
    ["9" * 310, "1e17", "-5", "0", "soon", "12.5", "0x10", "9" * 16, "1_000"],
)
def test_malformed_deadlines_are_400_naming_the_header(served, value):
    r = httpx.get(served.url + "/x", headers={"x-mesh-deadline": value}, timeout=10)
    assert r.status_code == 400, r.text
    assert "x-mesh-deadline" in r.json()["error"]
    assert httpx.get(served.url + "/x", timeout=10).status_code == 200  # and it goes on serving


@pytest.mark.parametrize(
    "value",
    [
        "garbage",
        "00-" + "0" * 32 + "-" + "0" * 16 + "-01",
        "ff-" + "a" * 32 + "-" + "b" * 16 + "-01",
        "x" * 5000,
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
    ],
)
def test_malformed_traceparent_is_ignored(served, value):
    r = httpx.get(served.url + "/x", headers={"traceparent": value, "tracestate": value}, timeout=10)
    assert r.status_code == 200


def test_far_deadlines_are_capped_at_an_hour():
    now = time.time()
    far = parse_deadline_header(str(int((now + 10 * 365 * 86400) * 1000)), wall_now=now)
    assert far == pytest.approx(now + MAX_INCOMING_DEADLINE)
    near = parse_deadline_header(str(int((now + 5) * 1000)), wall_now=now)
    assert near == pytest.approx(now + 5, abs=0.002)


@pytest.fixture(scope="module")
def fuzz_mesh():
    mesh = meshlib.Mesh(service="fuzzed", discovery=StaticDiscovery({}), control_plane="", access_log=True)
    yield mesh
    mesh.close()


HEADER_TEXT = st.one_of(
    st.text(max_size=80),
    st.from_regex(r"-?[0-9]{1,400}", fullmatch=True),
    st.from_regex(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", fullmatch=True),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    deadline=st.none() | HEADER_TEXT,
    traceparent=st.none() | HEADER_TEXT,
    tracestate=st.none() | st.text(max_size=200),
    attempt=st.none() | HEADER_TEXT,
    caller=st.none() | st.text(max_size=80),
)
def test_fuzz_inbound_headers_give_a_clean_answer(fuzz_mesh, deadline, traceparent, tracestate, attempt, caller):
    headers = {"x-mesh-deadline": deadline, "x-mesh-attempt": attempt, "x-mesh-caller": caller}
    carrier = {k: v for k, v in {"traceparent": traceparent, "tracestate": tracestate}.items() if v is not None}
    adm = admit(fuzz_mesh, "GET", "/x", headers.get, None, carrier)
    if adm.reply is not None:
        assert adm.reply.status in (400, 504)
    else:
        assert adm.deadline is None or adm.deadline <= time.time() + MAX_INCOMING_DEADLINE + 1
        adm.finish(200)


def test_denial_log_lines_are_escaped_and_rate_limited(caplog):
    """A path with %0A (decoded to a newline by the server) wrote a forged line into the authz log, once per
    request. Now the line is escaped, and a flood of denials writes one line a second per caller identity."""
    import logging

    from meshlib.rules.model import validate_rules

    mesh = meshlib.Mesh(service="ledger", discovery=StaticDiscovery({}), control_plane="")
    try:
        mesh.apply_rules(
            validate_rules({"services": {"ledger": {"authorization": {"mode": "strict", "allow": ["payments"]}}}})
        )
        caplog.set_level(logging.WARNING, logger="meshlib.authz")
        forged = "/x\n2026-12-03 WARNING meshlib.authz authorization allowed GET /admin"
        for _ in range(200):
            adm = admit(mesh, "GET", forged, {}.get, None, {})
            assert adm.reply is not None and adm.reply.status == 403
    finally:
        mesh.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "meshlib.authz"]
    assert 1 <= len(lines) <= 3, f"{len(lines)} denial lines for 200 denials in well under a second"
    assert all("\n" not in line for line in lines) and "\\n2026-12-03" in lines[0]
