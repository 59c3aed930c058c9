"""Which discovered instances a process may call, by its TLS mode (``MESH_TLS``) and what each instance advertises
(its ``mesh_tls`` metadata): applied to every discovery answer before the balancer sees it."""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..endpoints import EndpointSet
from ..policy.service import ServiceState

log = logging.getLogger("meshlib")


def tls_filter(mode: str, state: ServiceState) -> Callable[[EndpointSet], None]:
    """Instances this process cannot talk to are left out, with the reason kept for the error a caller would
    see. Strict mTLS never downgrades, whatever discovery says: instances advertising plaintext
    (``mesh_tls: off``) are skipped. A plaintext process cannot call instances that require mTLS
    (``mesh_tls: strict``): it would only get a closed connection, so it is told what to set instead."""
    if mode == "strict":
        unusable, why = (
            "off",
            (
                "advertise plaintext (mesh_tls: off) and were skipped, because MESH_TLS=strict never sends "
                "plaintext; run them with MESH_TLS=strict or permissive"
            ),
        )
    elif mode == "off":
        unusable, why = (
            "strict",
            (
                f"require mTLS (mesh_tls: strict) and were skipped: {state.name} requires mTLS; "
                "set MESH_TLS=strict or permissive (and MESH_BOOTSTRAP_TOKEN) in this process"
            ),
        )
    else:
        return state.set_endpoints

    def on_snapshot(snapshot: EndpointSet) -> None:
        skipped = [e for e in snapshot.endpoints if e.meta.get("mesh_tls") == unusable]
        if skipped:
            names = ", ".join(e.authority for e in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
            state.excluded = f"{len(skipped)} instance(s) ({names}) {why}"
            log.warning("%s: %s", state.name, state.excluded)
            snapshot = EndpointSet(
                snapshot.service, tuple(e for e in snapshot.endpoints if e not in skipped), snapshot.index
            )
        else:
            state.excluded = ""
        state.set_endpoints(snapshot)

    return on_snapshot
