"""The HTTP client's parts (the transports and clients themselves are in ``meshlib.http`` for now)."""
