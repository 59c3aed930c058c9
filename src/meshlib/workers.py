"""One shared pool of worker threads for the few places a sync API must run something beside the caller's thread
(a gRPC unary call's ``.future()``, the sync HTTP client's hedged attempts): made on first use, never per call."""

from __future__ import annotations

import concurrent.futures
import threading

_pool: concurrent.futures.ThreadPoolExecutor | None = None
_lock = threading.Lock()
SIZE = 64


def worker_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    if _pool is None:
        with _lock:
            if _pool is None:
                _pool = concurrent.futures.ThreadPoolExecutor(SIZE, thread_name_prefix="meshlib-worker")
    return _pool
