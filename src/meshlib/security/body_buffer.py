"""Read a request body on the event loop before a WSGI worker thread is taken.

A WSGI app reads its body from a worker thread (a2wsgi's pool, 32 by default): a client that sends a declared
body slowly would hold that thread for as long as it likes, and 32 such clients stop the app. Reading the body
first, in a coroutine, costs a slow client nothing but a coroutine (and the connection's body-rate bound closes it);
the thread is taken only once the body is in memory. Bodies over ``limit`` are streamed as before (an upload of
many megabytes is not held whole), with what was already read handed over first."""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Bodies up to this size are read whole before the app runs.
BUFFER_LIMIT = 1 << 20


def buffered_body(app: Any, limit: int = BUFFER_LIMIT) -> ASGIApp:
    async def with_body(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        parts: list[bytes] = []
        size = 0
        more = True
        ended: Message | None = None
        while more and size <= limit:
            message = await receive()
            if message["type"] != "http.request":
                ended = message  # the client went away: the app is told so at its first read
                break
            body = message.get("body", b"")
            if body:
                parts.append(body)
                size += len(body)
            more = bool(message.get("more_body", False))
        queued: list[Message] = [{"type": "http.request", "body": b"".join(parts), "more_body": more}]
        if ended is not None:
            queued = [ended]

        async def replay() -> Message:
            if queued:
                return queued.pop(0)
            return await receive()

        await app(scope, replay, send)

    return with_body
