"""The mesh as xDS resources, for proxyless gRPC clients (grpcio's and every other language's xDS client), built
from what the control plane already holds: the registry's instances and the rules. No I/O; the ADS server
(``xds_server.py``) serves what this returns.

Per service ``S``, as gRPC's xDS client asks for ``xds:///S``:

- Listener ``S``: an API listener whose HTTP connection manager takes its routes from RDS (over ADS) and ends
  in the router filter;
- RouteConfiguration ``S``: the service's rule routes in order (``path_prefix`` and header matches; one
  destination is a cluster, several are weighted clusters: a 90/10 canary), then a catch-all to ``S``; the
  service's ``timeout`` as the route's maximum stream duration, its ``retries`` as gRPC's retry policy;
- Cluster ``S`` (every instance) and ``S/<subset>`` per subset: EDS, round robin;
- ClusterLoadAssignment per cluster: its instances (a subset's: those its tags and meta select), all HEALTHY (the
  registry lists live instances only), one locality per ``zone`` meta weighted by its instances' ``weight`` meta;
  a node that names its zone (``node.locality.zone``) gets its zone at priority 0 and the others at 1.

And one RouteConfiguration ``mesh-outbound`` for Envoy sidecars (``meshctl xds bootstrap --envoy``): a virtual host
per service (``Host: S`` or ``S:<port>``) with the same routes, and HTTP method matches carried as ``:method``.

Not carried, because proxyless gRPC has no field for them: peak-EWMA with power of two choices, hedging, mirroring,
sticky hashing by header, HTTP method matches (a gRPC call is always POST: a route for other methods is left out).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from envoy.config.cluster.v3 import cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.common.fault.v3 import fault_pb2 as common_fault_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2

from ..endpoints import WEIGHT_META, ZONE_META, as_weight, zone_problem
from ..policy.config import BreakerPolicy
from ..policy.rules import Faults, HeaderMatch, Route, ServiceRules, Subset
from ..rules.model import Rules
from .xds_names import INBOUND_ROUTES, OUTBOUND
from .xds_security import envoy_upstream_tls, inbound_routes, pack, server_listener, upstream_tls

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINTS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
#: Every resource type served, in the order an xDS client needs them.
TYPES = (LISTENER, ROUTE, CLUSTER, ENDPOINTS)
#: gRPC status names a mesh retry maps to (the mesh retries unavailable instances and resets).
RETRY_ON = "unavailable"


@dataclass(frozen=True)
class InstanceView:
    """What a resource needs of one registry instance."""

    address: str
    port: int
    tags: frozenset[str] = frozenset()
    meta: Mapping[str, str] = field(default_factory=dict)


@dataclass
class Snapshot:
    """Every resource by type and name (packed as ``Any``), and each type's digest: a type whose digest did not
    change is not pushed again. ``tls``: clusters and listeners as a gRPC node with a mesh identity gets them (mTLS
    where the instances require it, through the ``mesh`` certificate provider); a node without one gets
    ``resources``, where those are plaintext (they refuse its calls, as they refuse any plaintext caller, and the
    node takes every other cluster). An Envoy node with an identity gets the clusters with mTLS through SDS files
    in its identity directory, built on first ask from ``strict`` (cluster, service) and kept per directory."""

    resources: dict[str, dict[str, any_pb2.Any]]
    digests: dict[str, str]
    tls: dict[str, dict[str, any_pb2.Any]] = field(default_factory=dict)
    strict: dict[str, tuple[cluster_pb2.Cluster, str]] = field(default_factory=dict)
    trust_domain: str = "mesh.local"
    _envoy: dict[str, dict[str, any_pb2.Any]] = field(default_factory=dict, repr=False)
    #: Each cluster's load assignment unpacked, and, per zone a node asked from, the assignments as it gets them.
    assignments: dict[str, endpoint_pb2.ClusterLoadAssignment] = field(default_factory=dict, repr=False)
    _zoned: dict[str, dict[str, any_pb2.Any]] = field(default_factory=dict, repr=False)

    def by_name(self, kind: str, tls: bool, identity_dir: str | None = None, zone: str = "") -> dict[str, any_pb2.Any]:
        if kind == ENDPOINTS:
            return self._endpoints_for(zone) if zone else self.resources[kind]
        if not tls:
            return self.resources[kind]
        if identity_dir is None or kind != CLUSTER:
            return self.tls.get(kind, self.resources[kind])
        variant = self._envoy.get(identity_dir)
        if variant is None:
            variant = dict(self.resources[CLUSTER])
            for name, (cluster, service) in self.strict.items():
                secured = cluster_pb2.Cluster()
                secured.CopyFrom(cluster)
                secured.transport_socket.CopyFrom(envoy_upstream_tls(service, self.trust_domain, identity_dir))
                variant[name] = pack(secured)
            if len(self._envoy) < MAX_IDENTITY_DIRS:  # bounded: node metadata is the nodes' to choose
                self._envoy[identity_dir] = variant
        return variant

    def _endpoints_for(self, zone: str) -> dict[str, any_pb2.Any]:
        variant = self._zoned.get(zone)
        if variant is None:
            variant = dict(self.resources[ENDPOINTS])
            for name, assignment in self.assignments.items():
                zoned = prioritised(assignment, zone)
                if zoned is not assignment:
                    variant[name] = pack(zoned)
            if len(self._zoned) < MAX_ZONES:  # bounded: the zone is the node's to choose
                self._zoned[zone] = variant
        return variant


#: Most Envoy identity directories whose cluster variant one snapshot keeps built, and most zones.
MAX_IDENTITY_DIRS = 256
MAX_ZONES = 256


def cluster_name(service: str, subset: str | None = None) -> str:
    return service if subset is None else f"{service}/{subset}"


def build_snapshot(
    instances: Mapping[str, Iterable[InstanceView]], rules: Rules, trust_domain: str = "mesh.local"
) -> Snapshot:
    """The resources of every service the registry lists or the rules name."""
    resources: dict[str, dict[str, any_pb2.Any]] = {kind: {} for kind in TYPES}
    tls: dict[str, dict[str, any_pb2.Any]] = {CLUSTER: {}, LISTENER: {}}
    strict_clusters: dict[str, tuple[cluster_pb2.Cluster, str]] = {}
    assignments: dict[str, endpoint_pb2.ClusterLoadAssignment] = {}
    names = sorted(set(instances) | set(rules.services))
    hosts = []
    for service in names:
        service_rules = rules.for_service(service) or ServiceRules()
        hosts.append(_virtual_host(service, service_rules, domains=[service, f"{service}:*"], methods=True))
        members = list(instances.get(service, ()))
        resources[LISTENER][service] = tls[LISTENER][service] = pack(_listener(service))
        for member in members:  # what an xDS-enabled gRPC server serving as this instance asks for; a node without
            # an identity gets it in plaintext (mesh callers' mTLS then fails against it, as against any plaintext)
            strict = member.meta.get("mesh_tls") == "strict"
            auth = service_rules.authorization
            plain = server_listener(member.address, member.port, False, auth, trust_domain)
            resources[LISTENER][plain.name] = pack(plain)
            tls[LISTENER][plain.name] = pack(server_listener(member.address, member.port, strict, auth, trust_domain))
        resources[ROUTE][service] = pack(_route_configuration(service, service_rules))
        inbound = inbound_routes(service, service_rules.authorization, trust_domain)
        resources[ROUTE][INBOUND_ROUTES.format(service)] = pack(inbound)
        clusters: list[tuple[str, Subset | None]] = [(cluster_name(service), None)]
        clusters += [(cluster_name(service, name), subset) for name, subset in sorted(service_rules.subsets.items())]
        strict = any(m.meta.get("mesh_tls") == "strict" for m in members)
        for name, subset in clusters:
            cluster = _cluster(name, service_rules.policy.circuit_breaker)
            resources[CLUSTER][name] = pack(cluster)
            if strict:
                plain_cluster = cluster_pb2.Cluster()
                plain_cluster.CopyFrom(cluster)
                strict_clusters[name] = (plain_cluster, service)
                cluster.transport_socket.CopyFrom(upstream_tls(service, trust_domain))
            tls[CLUSTER][name] = pack(cluster)
            selected = [m for m in members if subset is None or subset.selects(m.tags, m.meta)]
            assignments[name] = _load_assignment(name, selected)
            resources[ENDPOINTS][name] = pack(assignments[name])
    resources[ROUTE][OUTBOUND] = pack(route_pb2.RouteConfiguration(name=OUTBOUND, virtual_hosts=hosts))
    digests = {kind: _digest(by_name) for kind, by_name in resources.items()}
    for kind, variant in tls.items():
        digests[kind] = _digest({**resources[kind], **{f"tls:{n}": r for n, r in variant.items()}})
    return Snapshot(resources, digests, tls, strict_clusters, trust_domain, assignments=assignments)


def _digest(by_name: Mapping[str, any_pb2.Any]) -> str:
    h = hashlib.sha256()
    for name in sorted(by_name):
        h.update(name.encode() + b"\0" + by_name[name].SerializeToString(deterministic=True) + b"\0")
    return h.hexdigest()[:16]


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
    )


#: The fault filter's name: configured empty in the listener, per service on its virtual host.
FAULT_FILTER = "envoy.filters.http.fault"


def _listener(service: str) -> listener_pb2.Listener:
    manager = hcm_pb2.HttpConnectionManager(
        rds=hcm_pb2.Rds(config_source=_ads(), route_config_name=service),
        http_filters=[
            hcm_pb2.HttpFilter(name=FAULT_FILTER, typed_config=pack(fault_pb2.HTTPFault())),
            hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=pack(router_pb2.Router())),
        ],
    )
    return listener_pb2.Listener(name=service, api_listener=api_listener_pb2.ApiListener(api_listener=pack(manager)))


def _route_configuration(service: str, rules: ServiceRules) -> route_pb2.RouteConfiguration:
    host = _virtual_host(service, rules, domains=["*"], methods=False)
    return route_pb2.RouteConfiguration(name=service, virtual_hosts=[host])


def _virtual_host(
    service: str, rules: ServiceRules, domains: list[str], methods: bool
) -> route_components_pb2.VirtualHost:
    """The service's routes, then a catch-all to every instance. ``methods``: carry method matches as ``:method``
    (Envoy); without, a route for methods other than POST is left out (a gRPC call is always POST)."""
    routes = [_route(service, route, rules, methods) for route in rules.routes if methods or _grpc_can_match(route)]
    routes.append(
        route_components_pb2.Route(
            name="default",
            match=route_components_pb2.RouteMatch(prefix=""),
            route=_action(service, rules, [(cluster_name(service), 100)]),
        )
    )
    host = route_components_pb2.VirtualHost(name=service, domains=domains, routes=routes)
    if rules.faults is not None:
        host.typed_per_filter_config[FAULT_FILTER].CopyFrom(pack(_fault(rules.faults)))
    return host


def _percent(value: float) -> percent_pb2.FractionalPercent:
    return percent_pb2.FractionalPercent(
        numerator=round(value * 10_000), denominator=percent_pb2.FractionalPercent.MILLION
    )


def _fault(faults: Faults) -> fault_pb2.HTTPFault:
    """The service's ``faults`` for every call to it: a delay and an abort with an HTTP status (gRPC clients map it
    to a gRPC code as meshlib does: 503 is UNAVAILABLE)."""
    fault = fault_pb2.HTTPFault()
    if faults.delay_percent > 0:
        fault.delay.CopyFrom(
            common_fault_pb2.FaultDelay(fixed_delay=_duration(faults.delay), percentage=_percent(faults.delay_percent))
        )
    if faults.abort_percent > 0:
        fault.abort.CopyFrom(
            fault_pb2.FaultAbort(http_status=faults.abort_status, percentage=_percent(faults.abort_percent))
        )
    return fault


def _grpc_can_match(route: Route) -> bool:
    return route.methods is None or "POST" in route.methods


def _route(service: str, route: Route, rules: ServiceRules, methods: bool = False) -> route_components_pb2.Route:
    match = route_components_pb2.RouteMatch(
        prefix=route.path_prefix or "", headers=[_header(header) for header in route.headers]
    )
    if methods and route.methods is not None:
        wanted = sorted(route.methods)
        matcher = (
            string_pb2.StringMatcher(exact=wanted[0])
            if len(wanted) == 1
            else string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex="|".join(wanted)))
        )
        match.headers.append(route_components_pb2.HeaderMatcher(name=":method", string_match=matcher))
    destinations = [(cluster_name(service, d.subset), d.weight) for d in route.to if d.weight > 0]
    return route_components_pb2.Route(
        name=route.name, match=match, route=_action(service, rules, destinations or [(cluster_name(service), 100)])
    )


def _header(header: HeaderMatch) -> route_components_pb2.HeaderMatcher:
    if header.exact is not None:
        matcher = string_pb2.StringMatcher(exact=header.exact)
    elif header.prefix is not None:
        matcher = string_pb2.StringMatcher(prefix=header.prefix)
    else:
        assert header.regex is not None
        matcher = string_pb2.StringMatcher(
            safe_regex=regex_pb2.RegexMatcher(regex=str(getattr(header.regex, "pattern", "")))
        )
    return route_components_pb2.HeaderMatcher(name=header.name, string_match=matcher)


def _action(service: str, rules: ServiceRules, destinations: list[tuple[str, int]]) -> route_components_pb2.RouteAction:
    action = route_components_pb2.RouteAction()
    if len(destinations) == 1:
        action.cluster = destinations[0][0]
    else:
        action.weighted_clusters.CopyFrom(
            route_components_pb2.WeightedCluster(
                clusters=[
                    route_components_pb2.WeightedCluster.ClusterWeight(
                        name=name, weight=wrappers_pb2.UInt32Value(value=weight)
                    )
                    for name, weight in destinations
                ]
            )
        )
    policy = rules.policy
    if policy.timeout is not None:
        action.max_stream_duration.max_stream_duration.CopyFrom(_duration(policy.timeout))
    retries = policy.retries.attempts - 1
    if retries > 0:
        action.retry_policy.CopyFrom(
            route_components_pb2.RetryPolicy(
                retry_on=RETRY_ON,
                num_retries=wrappers_pb2.UInt32Value(value=retries),
                retry_back_off=route_components_pb2.RetryPolicy.RetryBackOff(
                    base_interval=_duration(policy.retries.backoff_base),
                    max_interval=_duration(max(policy.retries.backoff_max, policy.retries.backoff_base)),
                ),
            )
        )
    return action


def _duration(seconds: float) -> duration_pb2.Duration:
    whole = int(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=round((seconds - whole) * 1e9))


def _cluster(name: str, breaker: BreakerPolicy) -> cluster_pb2.Cluster:
    """EDS over ADS, round robin, and the service's ``circuit_breaker`` as outlier detection: an instance is ejected
    after that many failures in a row, for ``open_for`` (longer each time, as Envoy does), at most
    ``max_ejection_percent`` of the cluster at once; ``panic_threshold_percent`` as Envoy's panic threshold. Envoy
    carries it all; gRPC's client implements only the success-rate and failure-percentage detectors, which the
    mesh's rules do not express, so a proxyless gRPC client ignores it (its calls are retried by the route's
    retry policy)."""
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads(), service_name=name),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
        outlier_detection=outlier_detection_pb2.OutlierDetection(
            consecutive_5xx=wrappers_pb2.UInt32Value(value=breaker.consecutive_failures),
            base_ejection_time=_duration(breaker.open_for),
            max_ejection_percent=wrappers_pb2.UInt32Value(value=round(breaker.max_ejection_percent)),
            enforcing_consecutive_5xx=wrappers_pb2.UInt32Value(value=100),
            enforcing_success_rate=wrappers_pb2.UInt32Value(value=0),  # the mesh ejects on failures in a row only
        ),
    )
    cluster.common_lb_config.healthy_panic_threshold.value = breaker.panic_threshold_percent
    return cluster


def _placement(member: InstanceView) -> tuple[str, int]:
    """An instance's zone and weight, from its meta as meshlib's clients read them (invalid: none, and 1)."""
    zone = member.meta.get(ZONE_META, "")
    try:
        weight = as_weight(member.meta.get(WEIGHT_META, 1))
    except ValueError:
        weight = 1
    return ("" if zone and zone_problem(zone) else zone), weight


def _load_assignment(name: str, members: list[InstanceView]) -> endpoint_pb2.ClusterLoadAssignment:
    """One locality per zone (a zoneless instance's is the empty one), all priority 0: a node with no zone treats
    every instance alike. Each endpoint carries its weight, each locality the sum of its endpoints' (gRPC weighs
    localities; Envoy, without locality-weighted balancing, weighs the endpoints across them)."""
    by_zone: dict[str, list[endpoint_components_pb2.LbEndpoint]] = {}
    totals: dict[str, int] = {}
    for member in sorted(members, key=lambda m: (m.address, m.port)):
        zone, weight = _placement(member)
        by_zone.setdefault(zone, []).append(
            endpoint_components_pb2.LbEndpoint(
                endpoint=endpoint_components_pb2.Endpoint(
                    address=address_pb2.Address(
                        socket_address=address_pb2.SocketAddress(address=member.address, port_value=member.port)
                    )
                ),
                health_status=health_check_pb2.HEALTHY,
                load_balancing_weight=wrappers_pb2.UInt32Value(value=weight),
            )
        )
        totals[zone] = totals.get(zone, 0) + weight
    localities = [
        endpoint_components_pb2.LocalityLbEndpoints(
            locality=base_pb2.Locality(zone=zone),
            lb_endpoints=by_zone[zone],
            load_balancing_weight=wrappers_pb2.UInt32Value(value=totals[zone]),
        )
        for zone in sorted(by_zone)
    ]
    return endpoint_pb2.ClusterLoadAssignment(cluster_name=name, endpoints=localities)


def prioritised(assignment: endpoint_pb2.ClusterLoadAssignment, zone: str) -> endpoint_pb2.ClusterLoadAssignment:
    """``assignment`` as a node in ``zone`` gets it: its zone's locality at priority 0, the others at 1, so the node
    fails over to them only when its zone has nothing healthy (xDS priorities, as meshlib's clients prefer their
    zone). Unchanged when the zone has no locality or is the only one (priorities must start at 0 with no gap)."""
    zones = {locality.locality.zone for locality in assignment.endpoints}
    if zone not in zones or len(zones) == 1:
        return assignment
    out = endpoint_pb2.ClusterLoadAssignment()
    out.CopyFrom(assignment)
    for locality in out.endpoints:
        locality.priority = 0 if locality.locality.zone == zone else 1
    return out
