"""Authorization by identity, from the rules' ``authorization`` block of the *serving* service. Pure: no I/O.

Identity only ever comes from the verified peer certificate, never from a header."""

from __future__ import annotations

from dataclasses import dataclass

from ..policy.rules import Authorization
from .spiffe import SpiffeId


@dataclass(frozen=True, slots=True)
class Ruling:
    allowed: bool
    #: Permissive mode: allowed, but strict mode would have denied it (logged and counted).
    would_deny: bool
    reason: str


ALLOW = Ruling(True, False, "allowed")
NO_POLICY = Ruling(True, False, "no authorization policy")


def decide(policy: Authorization | None, peer: SpiffeId | None, trust_domain: str, namespace: str) -> Ruling:
    if policy is None or policy.mode == "off":
        return NO_POLICY
    verdict = _check(policy.allow, peer, trust_domain, namespace)
    if verdict is None:
        return ALLOW
    if policy.mode == "permissive":
        return Ruling(True, True, verdict)
    return Ruling(False, False, verdict)


def _check(allow: frozenset[str], peer: SpiffeId | None, trust_domain: str, namespace: str) -> str | None:
    """None when allowed, else the reason for a denial."""
    if peer is None:
        return "no verified mesh identity (plaintext or a certificate without a mesh SPIFFE ID)"
    if peer.trust_domain != trust_domain:
        return f"{peer} is from another trust domain"
    if "*" in allow or peer.uri in allow:
        return None
    if peer.namespace == namespace and peer.service in allow:
        return None
    return f"{peer} is not in the allow list"
