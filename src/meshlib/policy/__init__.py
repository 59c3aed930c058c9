"""The per-call policy: pure decision code with no I/O, shared by every transport (sync, async, grpc)."""
