"""The mesh's own random source, never the process's global ``random``.

An application that seeds ``random`` (a simulation, a reproducible test) gets the same sequence with meshlib loaded
as without: the balancer's draws, retry and poll jitter, fault injection, trace and span ids and access-log
sampling all come from this instance. Seeded from the OS at import, and again in every forked child, as the
global instance is: a pre-fork server's workers would otherwise repeat each other's draws (the same trace ids,
the same balancing choices)."""

from __future__ import annotations

import os
import random

_SOURCE = random.Random()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_SOURCE.seed)

#: A float in [0, 1).
uniform = _SOURCE.random
getrandbits = _SOURCE.getrandbits
randrange = _SOURCE.randrange
