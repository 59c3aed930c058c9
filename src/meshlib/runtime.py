"""The runtime every shell runs on: settings, clock and randomness, telemetry, the TLS identity, the services with
their discovery watches and compiled rules, and the idle-watch sweeper.

Clients, channels and servers depend on this module, never on ``mesh.py``: ``Mesh`` (the public façade) is the
composition root that builds them on a runtime, so the import graph points one way (``mesh`` -> shells ->
``runtime``). The process default (``meshlib.Client()`` without ``mesh=``) lives here too, built by the factory
``mesh.py`` registers, so a shell can find it without importing the façade.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, Self

from . import gc_pauses
from .appname import warn_guessed_name
from .discovery import Discovery
from .discovery.factory import make_discovery
from .errors import ConfigurationError, NoEndpointsError
from .policy.config import DEFAULT_POLICY, ServicePolicy
from .policy.service import ServiceState
from .randomness import uniform
from .rules.checks import parse_duration
from .rules.model import EMPTY_RULES, Rules
from .rules.watcher import RulesWatcher
from .security.reach import tls_filter
from .security.spiffe import SpiffeId
from .settings import MeshSettings, control_plane_verify, env_value
from .telemetry import Telemetry
from .telemetry.report import StatsReporter

log = logging.getLogger("meshlib")

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

    from .security.identity import Identity


class MirrorSink(Protocol):
    """Where a route's mirrored copies go (``meshlib.mirror.MirrorSender``, built by the façade at first use)."""

    def submit(self, service: str, request: Any, subset: str) -> None: ...

    def close(self) -> None: ...


class Runtime:
    """One per process (``Mesh`` is its public face): what every call, channel and server shares."""

    def __init__(
        self,
        service: str | None = None,
        *,
        discovery: str | Discovery | None = None,
        control_plane: str | None = None,
        tls: str | None = None,
        state_dir: str | None = None,
        policies: Mapping[str, ServicePolicy] | None = None,
        default_policy: ServicePolicy = DEFAULT_POLICY,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = uniform,
        paused: Callable[[], float] | None = None,
        settings: MeshSettings | None = None,
        telemetry: bool | None = None,
        access_log: bool | None = None,
        tracer_provider: TracerProvider | None = None,
        zone: str | None = None,
    ) -> None:
        self.settings = settings or MeshSettings.from_env(
            service=service,
            discovery=discovery if isinstance(discovery, str) else None,
            control_plane=control_plane,
            tls=tls,
            state_dir=state_dir,
            telemetry=telemetry,
            access_log=access_log,
            zone=zone,
        )
        self.service = self.settings.service
        if service is None and settings is None and not env_value("service"):
            warn_guessed_name(self.service)
        self.telemetry: Telemetry | None = None
        if self.settings.telemetry:
            self.telemetry = Telemetry(
                self.service,
                tracer_provider=tracer_provider,
                access_log=self.settings.access_log,
                access_log_sample=self.settings.access_log_sample,
            )
        self.discovery = discovery if isinstance(discovery, Discovery) else make_discovery(self.settings)
        self.clock = clock
        self.rand = rand
        self.paused = paused or gc_pauses.meter_for(clock)  # garbage-collection pauses, kept out of latency estimates
        self.default_policy = default_policy
        self._policies: dict[str, ServicePolicy] = dict(policies or {})
        self._services: dict[str, ServiceState] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._sweeper: threading.Thread | None = None
        self._sweep_stop = threading.Event()
        #: Sent as ``x-mesh-caller`` on every mesh request (informational; authorization never trusts it).
        self.caller_header = (b"x-mesh-caller", self.service.encode("ascii"))
        self.identity: Identity | None = None
        #: Inbound headers sent on by outbound calls (MESH_PROPAGATE_HEADERS), parsed once.
        self.propagated_names = self.settings.propagated_names
        #: Every mesh hop is mTLS with the peer's identity verified, whatever discovery advertises.
        self.strict = self.settings.tls == "strict"
        self._server_names: dict[str, str] = {}
        if self.settings.tls != "off":
            self.identity = self._start_identity()
            if self.telemetry is not None:
                self.telemetry.metrics.cert_expiry.read = self.identity.seconds_to_expiry
        self.rules: Rules = EMPTY_RULES
        self.rules_watcher: RulesWatcher | None = None
        if self.settings.control_plane:
            self.rules_watcher = RulesWatcher(
                self.settings.control_plane,
                self.apply_rules,
                state_dir=self.settings.state_dir,
                verify=control_plane_verify(self.settings),
            ).start()
        #: Golden-signal reports for the control plane's dashboard (``MESH_STATS_INTERVAL``; 0 turns them off).
        self.stats: StatsReporter | None = None
        if self.settings.control_plane and self.telemetry is not None and self.settings.stats_interval > 0:
            self.stats = StatsReporter(
                self,
                self.settings.control_plane,
                self.settings.stats_interval,
                token=self.settings.bootstrap_token,
                verify=control_plane_verify(self.settings),
            ).start()

    # -- per-service state ------------------------------------------------------------------------

    def _start_identity(self) -> Identity:
        # loaded here, not at import: cryptography adds ~10 MB RSS, which a process without mesh TLS never needs
        # (not to hide a cycle: tests/test_import_contracts.py walks function-level imports too)
        from .security.identity import Identity

        settings = self.settings
        lifetime = settings.tls_cert_lifetime
        try:
            requested = parse_duration(lifetime, maximum=7 * 86400.0) if lifetime else None
        except ValueError as exc:
            raise ConfigurationError(f"MESH_TLS_CERT_LIFETIME={lifetime!r}: {exc}") from None
        identity = Identity(
            SpiffeId(settings.trust_domain, settings.namespace, self.service),
            settings.state_dir,
            control_plane=settings.control_plane or None,
            bootstrap_token=settings.bootstrap_token or None,
            cert_file=settings.tls_cert or None,
            key_file=settings.tls_key or None,
            ca_file=settings.tls_ca or None,
            lifetime=requested,
            verify=control_plane_verify(settings),
        )
        return identity.start(timeout=self.settings.discovery_timeout * 6)

    def server_name(self, service: str) -> str:
        """The name a mesh server's certificate is verified against: ``<service>.<namespace>.mesh`` (made once per
        service: it is asked on every call)."""
        names = self._server_names
        name = names.get(service)
        if name is None:
            if len(names) >= 10_000:  # bounded, whatever a process calls
                names.clear()
            name = names[service] = f"{service}.{self.settings.namespace}.mesh"
        return name

    def apply_rules(self, rules: Rules) -> None:
        """Swap in a new rules document: every service's routes and policy change at once; calls in flight keep
        what they started with."""
        self.rules = rules
        for name, state in list(self._services.items()):
            state.set_rules(rules.for_service(name), self.policy_for(name))
        if self.telemetry is not None:
            self.telemetry.metrics.rules_version.set(rules.version, (("mesh.service", self.service),))

    def policy_for(self, service: str) -> ServicePolicy:
        return self._policies.get(service, self.default_policy)

    def set_policy(self, service: str, policy: ServicePolicy) -> None:
        """Override the policy of one service; calls already in flight keep the one they started with."""
        self._policies[service] = policy
        state = self._services.get(service)
        if state is not None:
            state.set_policy(policy)

    def service_state(self, service: str) -> ServiceState:
        """The live state of ``service``; the first call starts a discovery watch and waits for its first answer
        (bounded by ``discovery_timeout``)."""
        state = self._services.get(service)
        if state is None:
            state = self._create_state(service)
        if state.snapshot is None and not self.discovery.wait_ready(service, self.settings.discovery_timeout):
            last = self.discovery.last_error(service)
            raise NoEndpointsError(
                f"{service}: discovery ({self.discovery.describe() or self.settings.discovery}) gave no answer within "
                f"{self.settings.discovery_timeout:g}s" + (f"; last error: {last}" if last else ""),
                service=service,
                reason=NoEndpointsError.NO_ANSWER,
            )
        return state

    def service_state_nowait(self, service: str) -> tuple[ServiceState, bool]:
        """The state and whether discovery has answered for it yet (for async callers, which must not block)."""
        state = self._services.get(service)
        if state is None:
            state = self._create_state(service)
        return state, state.snapshot is not None or self.discovery.is_ready(service)

    def _create_state(self, service: str) -> ServiceState:
        with self._lock:
            state = self._services.get(service)
            if state is not None:
                return state
            state = ServiceState(
                service, self.clock, self.policy_for(service), self._breaker_listener(service), self.settings.zone
            )
            service_rules = self.rules.for_service(service)
            if service_rules is not None:
                state.set_rules(service_rules, self.policy_for(service))
            self._services[service] = state
        self.discovery.watch(service, tls_filter(self.settings.tls, state))
        self._start_sweeper()
        return state

    def _start_sweeper(self) -> None:
        if self._sweeper is None and self.settings.watch_idle_timeout > 0:
            with self._lock:
                if self._sweeper is None:
                    self._sweeper = threading.Thread(target=self._sweep_loop, name="meshlib-idle-sweeper", daemon=True)
                    self._sweeper.start()

    def _sweep_loop(self) -> None:
        timeout = self.settings.watch_idle_timeout
        while not self._sweep_stop.wait(min(60.0, timeout / 4)):
            self.drop_idle_watches()

    def drop_idle_watches(self) -> list[str]:
        """Stop watching services no call has used for ``watch_idle_timeout`` (a gateway's long tail of names must
        not keep a watch each forever). The next call to one of them watches it again."""
        cutoff = self.clock() - self.settings.watch_idle_timeout
        with self._lock:
            idle = [name for name, state in self._services.items() if state.last_used < cutoff]
            for name in idle:
                del self._services[name]
        for name in idle:
            self.discovery.unwatch(name)
        if idle:
            log.info(
                "stopped watching %d service(s) unused for %.0fs: %s",
                len(idle),
                self.settings.watch_idle_timeout,
                ", ".join(idle[:10]),
            )
        return idle

    def explain_empty(self, service: str) -> str:
        """For an error about a service with no endpoints: where discovery looked, whether the name was ever
        registered, and close known names ("did you mean inventory?"). Does I/O: for error paths only."""
        parts = [f"discovery: {self.discovery.describe() or self.settings.discovery}"]
        never = self.discovery.never_registered(service)
        if never is True:
            parts.append(f"{service} was never registered")
        elif never is False:
            parts.append(f"{service} was registered, but none of its instances is there now")
        import difflib  # only to explain an unknown name: it costs 0.7 MB of RSS at import

        close = difflib.get_close_matches(service, [n for n in self.discovery.known_services() if n != service], 3)
        if close:
            parts.append("did you mean " + " or ".join(close) + "?")
        return "; ".join(parts)

    def _breaker_listener(self, service: str) -> Callable[[str, str, str], None] | None:
        if self.telemetry is None:
            return None
        metrics = self.telemetry.metrics

        def on_transition(endpoint: str, old: str, new: str) -> None:
            labels = (("mesh.service", self.service), ("mesh.peer_service", service), ("mesh.endpoint", endpoint))
            metrics.breaker_transitions.add(1, (*labels, ("mesh.breaker_state", new)))
            if new == "open" and old == "closed":
                metrics.ejections.add(1, labels)

        return on_transition

    @property
    def services(self) -> Mapping[str, ServiceState]:
        return dict(self._services)

    @functools.cached_property
    def mirror(self) -> MirrorSink:
        """Where mirrored copies go; the façade (``Mesh``) provides it, started by the first copy a route draws."""
        return self.make_mirror()

    def make_mirror(self) -> MirrorSink:
        """The sender ``meshlib.mirror`` registers (it is loaded with the HTTP clients, the only callers that
        mirror); without it copies are dropped, said once."""
        factory = HOOKS.mirror
        return factory(self) if factory is not None else _NoMirror()

    # -- lifecycle --------------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sweep_stop.set()
        if "mirror" in self.__dict__:
            self.mirror.close()
        if self.rules_watcher is not None:
            self.rules_watcher.close()
        if self.stats is not None:
            self.stats.close()
        if self.identity is not None:
            self.identity.close()
        self.discovery.close()
        if self.telemetry is not None:
            self.telemetry.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Hooks:
    """Parts a runtime uses that live above it, registered by their modules when loaded (so that the arrows of
    the import graph keep pointing down): the mirror's sender (``meshlib.mirror``)."""

    mirror: Callable[[Runtime], MirrorSink] | None = None


HOOKS = _Hooks()


class _NoMirror:
    def __init__(self) -> None:
        self.warned = False

    def submit(self, service: str, request: Any, subset: str) -> None:
        if not self.warned:
            self.warned = True
            log.warning(
                "%s: a route mirrors to %r, but meshlib.mirror is not loaded: copies are dropped", service, subset
            )

    def close(self) -> None:
        pass


class _DefaultHolder:
    """The process default runtime (``meshlib.Client()`` without ``mesh=``), made once, from the environment, by
    ``factory`` (``mesh.py`` sets it to ``Mesh``, so the default is the public façade)."""

    def __init__(self) -> None:
        self.factory: Callable[..., Runtime] = Runtime
        self.current: Runtime | None = None
        self.lock = threading.Lock()

    def get(self) -> Runtime:
        current = self.current
        if current is None:
            with self.lock:
                current = self.current
                if current is None:
                    current = self.current = self.factory()
        return current

    def set(self, runtime: Runtime | None) -> None:
        with self.lock:
            self.current = runtime


#: The process default (see ``_DefaultHolder``).
PROCESS_DEFAULT = _DefaultHolder()


def process_default() -> Runtime:
    """The process-wide runtime built from the environment (the one ``meshlib.Mesh.default()`` returns)."""
    return PROCESS_DEFAULT.get()
