"""SPIFFE IDs (``spiffe://<trust-domain>/ns/<namespace>/sa/<service>``) and the DNS name that goes with them."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ConfigurationError

_ID = re.compile(r"^spiffe://([a-z0-9.-]+)/ns/([a-z0-9-]+)/sa/([a-z0-9-]+)$")


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service: str

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        m = _ID.match(uri)
        if not m:
            raise ConfigurationError(f"{uri!r} is not a mesh SPIFFE ID (spiffe://<trust-domain>/ns/<ns>/sa/<service>)")
        return cls(m.group(1), m.group(2), m.group(3))

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service}"

    @property
    def dns_name(self) -> str:
        """The name a client verifies the server by (SNI and hostname check)."""
        return dns_name(self.service, self.namespace)

    def __str__(self) -> str:
        return self.uri


def dns_name(service: str, namespace: str) -> str:
    return f"{service}.{namespace}.mesh"


#: One more DNS name in every instance certificate, the ``server_name`` a Prometheus scraping strict instances checks:
#: Prometheus has one ``server_name`` per scrape job, never per target, so without a shared name each service needed
#: a job of its own. Two labels, so no service's ``<service>.<namespace>.mesh`` can ever equal it: a mesh client,
#: which checks that name, is never satisfied by this one.
SCRAPE_SERVER_NAME = "metrics.mesh"
