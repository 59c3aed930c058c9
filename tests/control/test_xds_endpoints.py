"""Load assignments as xDS clients get them: one locality per zone weighted by its instances' weights, each
endpoint's weight, and a node's own zone at priority 0 with the others at 1 (never a gap in the priorities)."""

from __future__ import annotations

from envoy.config.endpoint.v3 import endpoint_pb2

from meshlib.control.xds_resources import ENDPOINTS, MAX_ZONES, InstanceView, build_snapshot
from meshlib.rules.model import validate_rules

RULES = validate_rules({}, 1)


def view(port: int, zone: str = "", weight: str = "") -> InstanceView:
    meta = {k: v for k, v in (("zone", zone), ("weight", weight)) if v}
    return InstanceView("127.0.0.1", port, meta=meta)


def assignment(snapshot, zone: str = "") -> dict[str, tuple[int, int, list[tuple[int, int]]]]:
    """zone -> (priority, locality weight, [(port, weight)])."""
    message = endpoint_pb2.ClusterLoadAssignment()
    snapshot.by_name(ENDPOINTS, False, None, zone)["inventory"].Unpack(message)
    return {
        loc.locality.zone: (
            loc.priority,
            loc.load_balancing_weight.value,
            [(e.endpoint.address.socket_address.port_value, e.load_balancing_weight.value) for e in loc.lb_endpoints],
        )
        for loc in message.endpoints
    }


def test_localities_per_zone_with_weights_and_the_node_s_zone_first():
    members = [view(1, "a", "3"), view(2, "a"), view(3, "b", "2"), view(4)]
    snapshot = build_snapshot({"inventory": members}, RULES)
    assert assignment(snapshot) == {"": (0, 1, [(4, 1)]), "a": (0, 4, [(1, 3), (2, 1)]), "b": (0, 2, [(3, 2)])}
    zoned = assignment(snapshot, "b")
    assert {z: p for z, (p, _, _) in zoned.items()} == {"": 1, "a": 1, "b": 0}
    assert assignment(snapshot, "c") == assignment(snapshot)  # no instance in its zone: no priorities, no gap


def test_invalid_placement_meta_counts_as_none_and_zones_per_snapshot_are_bounded():
    snapshot = build_snapshot({"inventory": [view(1, "bad zone", "0"), view(2, "a")]}, RULES)
    assert assignment(snapshot) == {"": (0, 1, [(1, 1)]), "a": (0, 1, [(2, 1)])}
    for n in range(MAX_ZONES + 10):
        snapshot.by_name(ENDPOINTS, False, None, f"z{n}")
    assert len(snapshot._zoned) == MAX_ZONES
