"""Where the cost of mesh TLS goes, one side at a time (not a CI test).

    python bench/tls_layers.py [--rounds 15] [--requests 1000] [--cpu 0]

``bench/overhead.py`` measures the whole hop (meshlib client → ``meshlib.serve``). This splits it:

  * server side: uvicorn (uvloop + httptools) with a trivial ASGI app, driven by a raw blocking client, in three
    forms: plaintext; TLS as uvicorn does it (headers and body as two TLS records); TLS with meshlib's protocol
    (``with_peer_identity``: one record per small response, peer identity in the scope). Reports wall time and the
    server process's CPU per request.
  * client side: httpcore's connection pool (what ``meshlib.Client`` uses for mesh hops) against a bare uvloop
    protocol that answers every request with one write, plaintext vs TLS. Reports wall time and client CPU.

Interleaved rounds; medians. Certificates come from a throw-away mesh CA made here.
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESPONSE = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 4\r\n\r\n"ok"'
REQUEST = b"GET / HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * 200 + b"\r\n\r\n"


def make_cert(directory: Path) -> tuple[str, str]:
    """A leaf certificate and key from a throw-away mesh CA (the client does not verify it: see client_context)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from meshlib.security.ca import CertificateAuthority

    ca = CertificateAuthority.init(directory / "ca")
    key = ec.generate_private_key(ec.SECP256R1())
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(ca.issue(key.public_key(), "bench").pem())
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_file), str(key_file)


def server_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


def run_server(kind: str, cert: str, key: str) -> None:
    """Child process: one server of the given kind on a free port, which it prints."""
    import asyncio

    import uvicorn
    import uvloop

    from meshlib.security.server_tls import with_peer_identity

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    if kind.startswith("bare-"):

        class Answer(asyncio.Protocol):
            def connection_made(self, transport: Any) -> None:
                self.transport = transport

            def data_received(self, data: bytes) -> None:
                self.transport.write(RESPONSE)

        async def main() -> None:
            ctx = server_context(cert, key) if kind == "bare-tls" else None
            server = await asyncio.get_running_loop().create_server(Answer, sock=sock, ssl=ctx)
            await server.serve_forever()

        uvloop.run(main())
        return

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"4")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b'"ok"'})

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", loop="uvloop", http="httptools")
    if kind != "uvicorn-plain":
        config.load()
        config.ssl = server_context(cert, key)
        if kind == "uvicorn-tls-meshlib":
            config.http_protocol_class = with_peer_identity(config.http_protocol_class)
    uvicorn.Server(config).run(sockets=[sock])


def cpu_ns(pid: int) -> int:
    """CPU time of a process's main thread (the event loop), in ns."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


def interleaved(
    calls: dict[str, tuple[Callable[[], object], int]], rounds: int, n: int
) -> dict[str, tuple[float, float]]:
    """label -> (median wall us, median CPU us of the given pid) per call, over interleaved rounds of n calls."""
    results: dict[str, list[tuple[float, float]]] = {label: [] for label in calls}
    for call, _ in calls.values():
        for _ in range(300):  # warm up
            call()
    for _ in range(rounds):
        for label, (call, pid) in calls.items():
            cpu0, wall0 = cpu_ns(pid), time.perf_counter()
            for _ in range(n):
                call()
            results[label].append(((time.perf_counter() - wall0) / n * 1e6, (cpu_ns(pid) - cpu0) / n / 1e3))
    return {
        label: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
        for label, rs in results.items()
    }


def client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # a benchmark of record costs, not of verification (done once per connection)
    return ctx


def start(kind: str, cert: str, key: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, cert, key], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # listening?
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{kind} server did not start")


def server_side(cert: str, key: str, rounds: int, n: int) -> None:
    kinds = ["uvicorn-plain", "uvicorn-tls", "uvicorn-tls-meshlib"]
    servers = {kind: start(kind, cert, key) for kind in kinds}
    try:
        conns: dict[str, socket.socket] = {}
        for kind, (_, port) in servers.items():
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conns[kind] = client_context().wrap_socket(sock) if kind != "uvicorn-plain" else sock

        def one(sock: socket.socket) -> None:
            sock.sendall(REQUEST)
            data = b""
            while not data.endswith(b'"ok"'):
                data += sock.recv(65536)

        calls = {kind: (functools.partial(one, conns[kind]), servers[kind][0].pid) for kind in kinds}
        results = interleaved(calls, rounds, n)
        print(f"\n== server side: uvicorn + a raw client ({rounds} interleaved rounds x {n} requests)")
        for kind, (wall, cpu) in results.items():
            print(f"  {kind:22s} per request {wall:6.1f} us   server CPU {cpu:6.1f} us")
    finally:
        for proc, _ in servers.values():
            proc.kill()


def client_side(cert: str, key: str, rounds: int, n: int) -> None:
    import httpcore

    servers = {kind: start(kind, cert, key) for kind in ("bare-plain", "bare-tls")}
    try:
        pool = httpcore.ConnectionPool(ssl_context=client_context())
        urls = {
            "plain": f"http://127.0.0.1:{servers['bare-plain'][1]}/",
            "tls": f"https://127.0.0.1:{servers['bare-tls'][1]}/",
        }
        headers = [(b"host", b"x"), (b"x-pad", b"a" * 200)]
        calls = {
            label: (functools.partial(pool.request, "GET", url, headers=headers), os.getpid())
            for label, url in urls.items()
        }
        results = interleaved(calls, rounds, n)
        print(f"\n== client side: httpcore against a one-write uvloop server ({rounds} rounds x {n} requests)")
        for label, (wall, cpu) in results.items():
            print(f"  {label:6s} per request {wall:6.1f} us   client CPU {cpu:6.1f} us")
        pool.close()
    finally:
        for proc, _ in servers.values():
            proc.kill()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        run_server(sys.argv[2], sys.argv[3], sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument(
        "--cpu",
        type=int,
        help="pin every process to this CPU: on a VM whose idle vCPUs halt, a wake-up across vCPUs costs tens of "
        "microseconds and depends on where the scheduler put each process; on one CPU the figures are CPU work",
    )
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})  # the servers inherit it
    print(f"{ssl.OPENSSL_VERSION}, Python {sys.version.split()[0]}, CPUs {sorted(os.sched_getaffinity(0))}")
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = make_cert(Path(tmp))
        server_side(cert, key, args.rounds, args.requests)
        client_side(cert, key, args.rounds, args.requests)


if __name__ == "__main__":
    main()
