"""Keeps the ADS server's snapshot in step with the control plane: on the HTTP side's event loop, a new snapshot
each time the registry or the rules change (no polling: the same change signals the long-polls wake on), handed
to the xDS thread."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ..errors import ConfigurationError
from ..rules.model import EMPTY_RULES, Rules, validate_rules
from .xds_resources import InstanceView, build_snapshot
from .xds_server import XdsServer

if TYPE_CHECKING:
    from .app import ControlPlane

log = logging.getLogger("meshlib.control.xds")

#: A snapshot is rebuilt at least this often even if no change signal came (a safety net, not the mechanism).
REFRESH = 30.0


async def feed(cp: ControlPlane, xds: XdsServer) -> None:
    rules: Rules = EMPTY_RULES
    rules_version = -1
    registry_index = -1
    while True:
        revision = cp.revision
        if revision.version != rules_version:
            try:
                rules = validate_rules(revision.document, revision.version)
            except (ConfigurationError, ValueError) as exc:  # stored before a check existed: keep the last good
                log.warning("xds: rules version %s cannot be served (%s); keeping the last good", revision.version, exc)
            rules_version = revision.version
        registry_index = cp.registry.index
        instances = {
            name: [InstanceView(i.address, i.port, frozenset(i.tags), dict(i.meta)) for i in items]
            for name, items in cp.registry.services().items()
        }
        xds.update(build_snapshot(instances, rules, cp.ca.trust_domain if cp.ca is not None else "mesh.local"))
        while cp.revision.version == rules_version and cp.registry.index == registry_index:
            waits = [
                asyncio.ensure_future(cp.rules_signal.wait(REFRESH)),
                asyncio.ensure_future(cp.registry.signal.wait(REFRESH)),
            ]
            try:
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
            if not any(w.result() for w in done if not w.cancelled()):
                break  # the refresh interval passed
