"""Threads beside the caller's, for the few places a sync API needs them: one shared pool for hedged attempts
(short: each is bounded by its call's deadline; made on first use, never per call), and a thread of its own for a
gRPC ``.future()``, which may stay open as long as its caller keeps it (a client-streaming upload) and so must
never hold a worker other calls wait for (its own pool, which starts a thread whenever none is idle)."""

from __future__ import annotations

import concurrent.futures
import contextvars
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

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


#: Futures open at once before one waits for a thread: far above what a process keeps open, so an upload held open
#: never holds up another call, while an idle thread is reused (starting one per call costs hundreds of us).
FUTURE_THREADS = 4096
_futures: concurrent.futures.ThreadPoolExecutor | None = None


def on_own_thread(work: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
    """Run ``work(*args)`` beside the caller, in the caller's context (its trace, its propagated headers), on a
    thread no other kind of work shares: an idle one if there is one, else a new one (up to ``FUTURE_THREADS``)."""
    global _futures
    if _futures is None:
        with _lock:
            if _futures is None:
                _futures = concurrent.futures.ThreadPoolExecutor(FUTURE_THREADS, thread_name_prefix="meshlib-future")
    return _futures.submit(contextvars.copy_context().run, work, *args)
