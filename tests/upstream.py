"""A real HTTP upstream for tests: a small ASGI app on uvicorn, run as its own process so tests can SIGKILL it.

    python tests/upstream.py --name a [--status 503] [--delay 0.05]

Prints ``LISTENING <port>`` once it accepts connections. Every answer is JSON naming the instance and echoing the
mesh headers it received. ``/-/behave?status=&delay=&slow_every=&slow_delay=&fail_every=`` changes behaviour at
run time;
``/-/count`` returns and ``/-/reset`` clears the per-method request counts. ``/-/upload`` hashes a streamed body;
``/-/download?size=N`` streams N bytes; ``/-/set-cookie?name=value`` sets cookies;
``/-/redirect?to=URL`` redirects.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import socket
import sys
from typing import Any
from urllib.parse import parse_qs

import uvicorn


def make_app(name: str, status: int, delay: float, forward_to: str = "") -> Any:
    state: dict[str, Any] = {
        "status": status,
        "delay": delay,
        "counts": {},
        "die_mid_body": False,
        "slow_every": 0,
        "slow_delay": 0.0,
        "fail_every": 0,
        "served": 0,
    }

    async def send_json(send: Any, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        await send(
            {
                "type": "http.response.start",
                "status": code,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(data)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": data})

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path = scope["path"]
        query = parse_qs(scope["query_string"].decode())
        if path == "/-/upload":  # streamed: counted and hashed as it arrives, never held whole
            digest, size = hashlib.sha256(), 0
            while True:
                message = await receive()
                part = message.get("body", b"")
                size += len(part)
                digest.update(part)
                if not message.get("more_body"):
                    break
            await send_json(send, 200, {"bytes": size, "sha256": digest.hexdigest()})
            return
        if path == "/-/download":  # ?size=N bytes, streamed in 64 KiB parts with a Content-Length
            size = int(query["size"][0])
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(size).encode())]}
            )
            part = bytes(range(256)) * 256
            while size > 0:
                piece = part[: min(size, len(part))]
                size -= len(piece)
                await send({"type": "http.response.body", "body": piece, "more_body": size > 0})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if path == "/-/behave":
            if "status" in query:
                state["status"] = int(query["status"][0])
            if "delay" in query:
                state["delay"] = float(query["delay"][0])
            if "slow_every" in query:  # every Nth request waits slow_delay seconds first
                state["slow_every"] = int(query["slow_every"][0])
                state["slow_delay"] = float(query.get("slow_delay", ["0.3"])[0])
            if "fail_every" in query:  # every Nth request answers 503
                state["fail_every"] = int(query["fail_every"][0])
            if "die_mid_body" in query:
                state["die_mid_body"] = query["die_mid_body"][0] == "1"
            await send_json(send, 200, {"instance": name, "status": state["status"], "delay": state["delay"]})
            return
        if forward_to and path.startswith("/fwd/"):  # a meshed caller: the rest of the path goes to forward_to
            import meshlib

            if "client" not in state:
                state["client"] = meshlib.AsyncClient(timeout=5.0)
            try:
                answer = await state["client"].get(f"http://{forward_to}/{path[5:]}")
                await send_json(send, answer.status_code, {"instance": name, "upstream": answer.json()})
            except Exception as exc:  # the caller sees why (tests read it)
                await send_json(send, 502, {"instance": name, "error": f"{type(exc).__name__}: {exc}"})
            return
        if path == "/-/set-cookie":  # ?name=value&...: an empty answer setting each cookie
            cookies = [(b"set-cookie", f"{key}={values[0]}; Path=/".encode()) for key, values in query.items()]
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0"), *cookies]})
            await send({"type": "http.response.body", "body": b""})
            return
        if path == "/-/redirect":  # ?to=<location>: a 302 there
            location = query["to"][0].encode()
            await send({"type": "http.response.start", "status": 302, "headers": [(b"location", location)]})
            await send({"type": "http.response.body", "body": b""})
            return
        if path == "/-/ok":  # a fixed tiny answer, for benchmarks
            await send_json(send, 200, "ok")
            return
        if path == "/-/count":
            await send_json(send, 200, state["counts"])
            return
        if path == "/-/reset":
            state["counts"] = {}
            await send_json(send, 200, {})
            return
        counts = state["counts"]
        counts[scope["method"]] = counts.get(scope["method"], 0) + 1
        if state["die_mid_body"]:  # headers out, then the process dies before the body: a reset mid-response
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"1000")]})
            await send({"type": "http.response.body", "body": b"x" * 10, "more_body": True})
            await asyncio.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
        state["served"] += 1
        if state["slow_every"] and state["served"] % state["slow_every"] == 0:
            await asyncio.sleep(state["slow_delay"])
        if state["delay"]:
            await asyncio.sleep(state["delay"])
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        failing = state["fail_every"] and state["served"] % state["fail_every"] == 0
        await send_json(
            send,
            503 if failing else state["status"],
            {
                "instance": name,
                "method": scope["method"],
                "path": path,
                "query": scope["query_string"].decode(),
                "body": body.decode(errors="replace"),
                "headers": headers,
            },
        )

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--status", type=int, default=200)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--mesh-service", help="run through meshlib.serve() as this service (registers itself)")
    parser.add_argument("--tags", default="", help="comma-separated tags, with --mesh-service")
    parser.add_argument("--header-timeout", type=float, default=10.0, help="with --mesh-service")
    parser.add_argument("--drain-delay", type=float, default=0.3, help="with --mesh-service")
    parser.add_argument("--forward-to", default="", help="/fwd/<path> calls <path> of this service over the mesh")
    parser.add_argument("--keep-alive", type=float, default=5.0, help="idle keep-alive connections closed after")
    parser.add_argument("--tls", nargs=3, metavar=("CERT", "KEY", "CA"), help="mTLS: client certificates required")
    args = parser.parse_args()
    app = make_app(args.name, args.status, args.delay, args.forward_to)
    if args.mesh_service:
        import meshlib

        meshlib.serve(
            app,
            service=args.mesh_service,
            port=args.port,
            tags=[t for t in args.tags.split(",") if t],
            log_level="warning",
            drain_delay=args.drain_delay,
            header_timeout=args.header_timeout,
            on_ready=lambda port: print(f"LISTENING {port}", flush=True),
        )
        return
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    tls: dict[str, Any] = {}
    if args.tls:
        import ssl

        cert, key, ca = args.tls
        tls = {"ssl_certfile": cert, "ssl_keyfile": key, "ssl_ca_certs": ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="on", timeout_keep_alive=args.keep_alive, **tls
    )
    server = uvicorn.Server(config)
    original_startup = server.startup

    async def startup(sockets: Any = None) -> None:
        await original_startup(sockets=sockets)
        print(f"LISTENING {sock.getsockname()[1]}", flush=True)

    server.startup = startup  # type: ignore[method-assign]
    server.run(sockets=[sock])
    sys.exit(0)


if __name__ == "__main__":
    main()
