"""The demo's scenes: each one an action on the running mesh and a check of what the traffic saw."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

if TYPE_CHECKING:
    from .demo import Demo, Traffic
    from .demo_samples import Sample


def demo_rules(v2_weight: int) -> dict[str, Any]:
    to: list[dict[str, Any]]
    if v2_weight >= 100:
        to = [{"subset": "v2"}]
    elif v2_weight <= 0:
        to = [{"subset": "v1"}]
    else:
        to = [{"subset": "v1", "weight": 100 - v2_weight}, {"subset": "v2", "weight": v2_weight}]
    return {
        "services": {
            # Who may call whom: enforced by each service, by the caller's certificate.
            "frontend": {"authorization": {"mode": "strict", "allow": ["loadgen"]}},
            "catalog": {"authorization": {"mode": "strict", "allow": ["frontend"]}},
            "inventory": {"authorization": {"mode": "strict", "allow": ["catalog"]}},
            "checkout": {"authorization": {"mode": "strict", "allow": ["frontend"]}},
            "payments": {
                "authorization": {"mode": "strict", "allow": ["checkout"]},
                # A 503 from payments means nothing was charged, so its POSTs may be retried on another instance.
                "retries": {"attempts": 3, "retry_non_idempotent": True},
                "circuit_breaker": {"consecutive_failures": 3, "open_for": "30s"},
                "subsets": {"v1": {"tags": ["v1"]}, "v2": {"tags": ["v2"]}},
                "routes": [
                    {"name": "pinned-v1", "match": {"headers": {"x-payments-version": "v1"}}, "to": [{"subset": "v1"}]},
                    {"name": "pinned-v2", "match": {"headers": {"x-payments-version": "v2"}}, "to": [{"subset": "v2"}]},
                    {"name": "split", "to": to},
                ],
            },
        }
    }


Check = Callable[[dict[str, Any], list["Sample"]], tuple[bool, str]]


def demo_scenes_for(demo: Demo, traffic: Traffic) -> list[tuple[str, str, Callable[[], None], Check]]:
    def share(stats: dict[str, Any], version: str) -> float:
        total = sum(stats["versions"].values())
        return stats["versions"][version] / total if total else 0.0

    def baseline(stats: dict[str, Any], _: list[Sample]) -> tuple[bool, str]:
        ok = stats["n"] > 0 and stats["failed"] == 0 and share(stats, "v1") == 1.0
        return ok, f"{stats['rps']:.0f} req/s, {stats['success']:.1%} ok, p50 {stats['p50']:.1f} ms, all payments on v1"

    def canary(percent: int) -> Check:
        def check(stats: dict[str, Any], _: list[Sample]) -> tuple[bool, str]:
            got = share(stats, "v2")
            n = max(1, sum(stats["versions"].values()))
            p = percent / 100
            # four standard deviations of a binomial share, plus one request; and a canary must really send some
            # traffic each way (a 5% rule that sent nothing to v2 fails, whatever the tolerance)
            tolerance = 4 * (p * (1 - p) / n) ** 0.5 + 1 / n
            both_sides = 0 < got < 1 if 0 < percent < 100 else True
            ok = stats["failed"] == 0 and abs(got - p) <= tolerance and both_sides
            return ok, f"payments v2 share {got:.1%} of {n} (rule: {percent}%), {stats['failed']} failed"

        return check

    def no_failures(what: str) -> Check:
        def check(stats: dict[str, Any], whole: list[Sample]) -> tuple[bool, str]:
            failed = sum(1 for s in whole if not s.ok)
            return failed == 0 and len(whole) > 0, f"{len(whole)} requests, {failed} failed; {what}"

        return check

    def kill_catalog() -> None:
        victim = next(c for c in demo.children if c.name == "catalog-1")
        victim.proc.kill()
        demo.say(f"  SIGKILL catalog-1 (port {victim.port}); its traffic must move away")

    def break_payments() -> None:
        demo.start(
            "payments-v2-broken", "payments", "payments:app", tags="v2", PAYMENTS_VERSION="v2", PAYMENTS_BROKEN="1"
        )
        demo.wait(lambda: len(demo.registered("payments")) == 5, 30, "the broken instance to register")
        demo.say("  a broken payments v2 instance (answers 503) joined; its breaker must open")

    def intruder() -> None:
        import meshlib

        outcome: dict[str, Any] = {}
        token = demo.join_token("intruder")
        outcome["impersonation"] = _impersonation_refused(demo.cp_url, token)
        os.environ["MESH_BOOTSTRAP_TOKEN"] = token  # the intruder's own identity, from its own join token
        with (
            meshlib.Mesh(
                service="intruder",
                discovery=f"registry://127.0.0.1:{demo.cp_port}",
                control_plane=demo.cp_url,
                tls="strict",
                state_dir=str(demo.tmp / "state" / "intruder"),
            ) as mesh,
            mesh.client() as client,
        ):
            answers = [client.post("http://payments/charge", json={"amount_cents": 1}) for _ in range(5)]
            outcome["codes"] = [a.status_code for a in answers]
            outcome["reason"] = answers[0].json().get("reason", "")
        os.environ["MESH_BOOTSTRAP_TOKEN"] = demo.join_token("loadgen")
        demo.intruder = outcome
        demo.say(f"  the intruder's join token asked for a 'payments' certificate: {outcome['impersonation']}")
        demo.say(f"  an 'intruder' service with a valid mesh identity called payments: {outcome['codes']}")

    def denied(stats: dict[str, Any], whole: list[Sample]) -> tuple[bool, str]:
        outcome = getattr(demo, "intruder", {})
        failed = sum(1 for s in whole if not s.ok)
        ok = outcome.get("codes") == [403] * 5 and "intruder" in outcome.get("reason", "") and failed == 0
        ok = ok and str(outcome.get("impersonation", "")).startswith("refused")
        return (
            ok,
            f"intruder got {outcome.get('codes')} ({_clip(outcome.get('reason', ''), 80)}), a payments certificate "
            f"{_clip(str(outcome.get('impersonation')), 40)}; shop traffic {failed} failed",
        )

    def stop_control_plane() -> None:
        assert demo.control_plane is not None
        demo.control_plane.kill()
        demo.control_plane.wait(5)
        demo.say("  control plane SIGKILLed: instances keep their last rules and endpoints")

    def still_routed(stats: dict[str, Any], whole: list[Sample]) -> tuple[bool, str]:
        failed = sum(1 for s in whole if not s.ok)
        got = share(stats, "v2")
        return failed == 0 and got == 1.0, f"{len(whole)} requests, {failed} failed, payments v2 share {got:.0%}"

    return [
        ("baseline", "every request succeeds", lambda: None, baseline),
        ("canary 5%", "about 5% of payments on v2", lambda: _apply(demo, 5), canary(5)),
        ("canary 50%", "about half of payments on v2", lambda: _apply(demo, 50), canary(50)),
        ("canary 100%", "every payment on v2", lambda: _apply(demo, 100), canary(100)),
        ("instance killed", "no failed requests", kill_catalog, no_failures("catalog-1 gone, traffic moved away")),
        (
            "broken instance",
            "no failed requests: retried, then ejected",
            break_payments,
            no_failures("the broken instance was retried around and ejected"),
        ),
        ("unauthorized caller", "403 before the handler runs, by certificate", intruder, denied),
        ("control plane down", "traffic and routing unaffected", stop_control_plane, still_routed),
    ]


def _apply(demo: Demo, percent: int) -> None:
    version = demo.apply_rules(demo_rules(percent))
    demo.say(f"  rules version {version}: payments v2 at {percent}%")


def _impersonation_refused(cp_url: str, token: str) -> str:
    """Ask the CA for a ``payments`` certificate with another service's join token: "refused (403)" expected."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "payments")]))
        .sign(key, hashes.SHA256())
    )
    body = {"csr": csr.public_bytes(serialization.Encoding.PEM).decode(), "service": "payments"}
    try:
        r = httpx.post(
            cp_url + "/v1/ca/sign", json=body, headers={"authorization": f"Bearer {token}"}, timeout=10, trust_env=False
        )
    except httpx.HTTPError as exc:
        return f"not answered ({exc})"
    return f"refused ({r.status_code})" if r.status_code in (401, 403) else f"ISSUED ({r.status_code})"


def _clip(text: str, limit: int) -> str:
    """At most ``limit`` characters, cut at a word boundary (a reason cut mid-word reads as a different word)."""
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + "…"
