"""The call machinery every client shell shares, protocol-neutral: ``driver`` carries a call through its policy
flow as a generator of effects, ``executors`` carry the effects out (threads and sleep, tasks and await), and
``recorder`` is what a call keeps between its attempts (spans, deadline, outcome, telemetry)."""
