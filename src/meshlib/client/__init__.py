"""The HTTP client as small parts, one job each: host names (``names``), httpx/httpcore errors and verdicts
(``errors``), response streams (``streams``), the per-call state and telemetry (``call``), the sync and async
transport shells (``transport``, ``async_transport``), the async engine's per-endpoint connection stacks
(``pools``), and ``Client`` / ``AsyncClient`` (``clients``). ``meshlib.http`` re-exports the public names."""
