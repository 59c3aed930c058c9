"""The lean HTTP/1.1 engines (client/async_h1.py, async; client/h1.py, sync) against scripted loopback servers that
answer byte for byte: chunked bodies, ``Connection: close``, 1xx answers, HEAD, bodies ended by the connection's
close, a server closing a reused connection, malformed and truncated answers, timeouts, cancellation, request
framing and injection. Tests marked ``both`` run once per engine: the sync one is driven from worker threads
through ``SyncEngine``, which gives it the async engine's interface."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpcore
import httpx
import pytest

import meshlib
from meshlib.client.async_h1 import AsyncH1Connection
from meshlib.client.async_pools import AsyncEndpointPools
from meshlib.client.outbound import Outbound
from meshlib.client.pools import EndpointPools
from meshlib.discovery import StaticDiscovery
from meshlib.endpoints import Endpoint

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Server"], Awaitable[None]]


class Server:
    """A loopback TCP server running ``script`` for every connection; it records each request it reads."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[tuple[bytes, dict[bytes, bytes], bytes]] = []
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client went away, or the test is over
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
        head = await reader.readuntil(b"\r\n\r\n")
        line, *lines = head[:-4].split(b"\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (h.split(b":", 1) for h in lines)}
        body = b""
        if headers.get(b"transfer-encoding") == b"chunked":
            while True:
                size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
                chunk = await reader.readexactly(size + 2)
                if size == 0:
                    break
                body += chunk[:-2]
        elif b"content-length" in headers:
            body = await reader.readexactly(int(headers[b"content-length"]))
        self.requests.append((line, headers, body))
        return line, headers, body


def request(port: int, method: bytes = b"GET", target: bytes = b"/", body: Any = b"", **kw: Any) -> Outbound:
    headers = [(b"host", b"svc"), *kw.get("headers", [])]
    if isinstance(body, bytes):
        if body or method in (b"POST", b"PUT"):
            headers.append((b"content-length", str(len(body)).encode()))
        stream: Any = httpx.ByteStream(body)
    else:
        stream = body
    timeout = kw.get("timeout", 5.0)
    timeouts = {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
    return Outbound(method, b"http", "127.0.0.1", port, target, headers, stream, {"timeout": timeouts})


async def fetch(pools: AsyncEndpointPools, outbound: Outbound) -> tuple[int, dict[bytes, bytes], bytes]:
    answer = await pools.send(outbound)
    if type(answer.stream) is bytes:  # the body came whole with the head
        return answer.status, {k.lower(): v for k, v in answer.headers}, answer.stream
    try:
        body = b"".join([part async for part in answer.stream])
    finally:
        await answer.stream.aclose()
    return answer.status, {k.lower(): v for k, v in answer.headers}, body


class SyncEngine:
    """``pools.EndpointPools`` behind ``AsyncEndpointPools``'s interface: every blocking call runs on a worker
    thread, so the scripted servers keep running on the test's event loop."""

    def __init__(self, **options: Any) -> None:
        self.pools = EndpointPools(**options)

    def stacks(self) -> dict[Any, Any]:
        return self.pools.stacks()

    async def send(self, outbound: Outbound) -> Any:
        if hasattr(outbound.stream, "__aiter__") and not hasattr(outbound.stream, "__iter__"):
            outbound.stream = [part async for part in outbound.stream]  # the sync engine iterates it itself
        answer = await asyncio.to_thread(self.pools.send, outbound)
        if type(answer.stream) is not bytes:
            answer.stream = _ThreadedParts(answer.stream)
        return answer

    async def aclose(self) -> None:
        await asyncio.to_thread(self.pools.close)

    def connections(self) -> int:
        return self.pools.connections()


class _ThreadedParts:
    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._parts = iter(stream)

    def __aiter__(self) -> _ThreadedParts:
        return self

    async def __anext__(self) -> bytes:
        part: bytes | None = await asyncio.to_thread(next, self._parts, None)
        if part is None:
            raise StopAsyncIteration
        return part

    async def aclose(self) -> None:
        await asyncio.to_thread(self._stream.close)


@pytest.fixture(params=["async", "sync"])
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "sync":
        monkeypatch.setitem(globals(), "AsyncEndpointPools", SyncEngine)
    return str(request.param)


both = pytest.mark.usefixtures("engine")


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(main(), 30))


OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


async def keep_answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
    while True:
        await server.read_request(reader)
        writer.write(OK)
        await writer.drain()


@both
def test_keep_alive_reuses_one_connection_for_sequential_calls():
    async def main() -> None:
        async with Server(keep_answering) as server:
            pools = AsyncEndpointPools()
            for _ in range(5):
                assert await fetch(pools, request(server.port)) == (200, {b"content-length": b"2"}, b"ok")
            assert server.connections == 1 and pools.connections() == 1
            await pools.aclose()

    run(main)


@both
def test_chunked_answers_are_decoded_and_the_connection_reused():
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        while True:
            await server.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            await writer.drain()
            for part in (b"hello ", b"chunked ", b"world"):
                writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                await writer.drain()
                await asyncio.sleep(0.01)  # separate segments: the client waits for each
            writer.write(b"0\r\nx-trailer: yes\r\n\r\n")

    async def main() -> None:
        async with Server(script) as server:
            pools = AsyncEndpointPools()
            for _ in range(2):
                status, headers, body = await fetch(pools, request(server.port))
                assert (status, body) == (200, b"hello chunked world")
                assert b"x-trailer" not in headers, "trailers are dropped, never mixed into the headers"
            assert server.connections == 1
            await pools.aclose()

    run(main)


@both
def test_connection_close_is_honoured():
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 3\r\n\r\nbye")
        await writer.drain()
        await asyncio.sleep(0.5)  # the server keeps the socket a while: the client must not reuse it anyway

    async def main() -> None:
        async with Server(script) as server:
            pools = AsyncEndpointPools()
            for _ in range(3):
                assert (await fetch(pools, request(server.port)))[2] == b"bye"
            assert server.connections == 3, "a new connection after every Connection: close"
            await pools.aclose()

    run(main)


@both
def test_informational_answers_are_skipped():
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        while True:
            await server.read_request(reader)
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)
            writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\nHTTP/1.1 201 Created\r\n")
            writer.write(b"content-length: 4\r\n\r\ndone")

    async def main() -> None:
        async with Server(script) as server:
            pools = AsyncEndpointPools()
            for _ in range(2):
                status, headers, body = await fetch(pools, request(server.port, b"POST", body=b"x"))
                assert (status, body) == (201, b"done") and b"link" not in headers
            assert server.connections == 1
            await pools.aclose()

    run(main)


@both
def test_an_upgrade_is_refused():
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n")
        await asyncio.sleep(1)

    async def main() -> None:
        async with Server(script) as server:
            with pytest.raises(httpcore.RemoteProtocolError, match="switched protocols"):
                await fetch(AsyncEndpointPools(), request(server.port))

    run(main)


@both
def test_head_answers_have_no_body_and_keep_the_connection():
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        while True:
            line, _, _ = await server.read_request(reader)
            if line.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
            else:
                writer.write(OK)

    async def main() -> None:
        async with Server(script) as server:
            pools = AsyncEndpointPools()
            status, headers, body = await fetch(pools, request(server.port, b"HEAD"))
            assert (status, headers[b"content-length"], body) == (200, b"1000", b"")
            assert await fetch(pools, request(server.port)) == (200, {b"content-length": b"2"}, b"ok")
            assert server.connections == 1
            await pools.aclose()

    run(main)


@both
def test_no_content_and_not_modified_have_no_body():
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 304 Not Modified\r\netag: x\r\n\r\n")
        await server.read_request(reader)
        writer.write(OK)

    async def main() -> None:
        async with Server(script) as server:
            pools = AsyncEndpointPools()
            assert (await fetch(pools, request(server.port)))[0::2] == (204, b"")
            assert (await fetch(pools, request(server.port)))[0::2] == (304, b"")
            assert (await fetch(pools, request(server.port)))[0::2] == (200, b"ok")
            assert server.connections == 1
            await pools.aclose()

    run(main)


@both
def test_a_body_ended_by_the_close_of_the_connection():
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\npart one, ")  # neither length nor chunked: the close ends it
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"part two")

    async def main() -> None:
        async with Server(script) as server:
            pools = AsyncEndpointPools()
            assert (await fetch(pools, request(server.port)))[2] == b"part one, part two"
            assert (await fetch(pools, request(server.port)))[2] == b"part one, part two"
            assert server.connections == 2 and pools.connections() == 0
            await pools.aclose()

    run(main)


@both
def test_a_server_closing_right_after_its_answer():
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)
        writer.write(OK)  # keep-alive by the protocol, then the server closes at once (a pipelined close)

    async def main() -> None:
        async with Server(script) as server:
            pools = AsyncEndpointPools()
            for _ in range(20):
                assert (await fetch(pools, request(server.port, b"POST", body=b"{}")))[2] == b"ok"
                await asyncio.sleep(0.005)
            assert server.connections >= 2
            await pools.aclose()

    run(main)


@both
def test_a_server_closing_a_reused_connection_before_answering_is_an_error_that_names_it():
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)
        writer.write(OK)
        await writer.drain()
        await server.read_request(reader)  # the second request arrives, and the server closes without a word

    async def main() -> None:
        async with Server(script) as server:
            pools = AsyncEndpointPools()
            assert (await fetch(pools, request(server.port)))[2] == b"ok"
            with pytest.raises(httpcore.RemoteProtocolError, match=r"without an answer.*reused keep-alive"):
                await fetch(pools, request(server.port, b"POST", body=b"{}"))
            assert pools.connections() == 0
            await pools.aclose()

    run(main)


@both
def test_a_truncated_body_is_an_error_and_the_connection_is_not_reused():
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b")

    async def main() -> None:
        async with Server(script) as server:
            pools = AsyncEndpointPools()
            with pytest.raises(httpcore.RemoteProtocolError, match="mid-body"):
                await fetch(pools, request(server.port))
            assert pools.connections() == 0

    run(main)


@both
@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok!",
        b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
        b"SMTP ready\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_malformed_answers_are_protocol_errors(answer: bytes):
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)
        writer.write(answer)
        await asyncio.sleep(1)

    async def main() -> None:
        async with Server(script) as server:
            pools = AsyncEndpointPools()
            with pytest.raises(httpcore.RemoteProtocolError, match="malformed HTTP response"):
                await fetch(pools, request(server.port))
            assert pools.connections() == 0

    run(main)


@both
def test_bytes_arriving_on_an_idle_connection_retire_it():
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)
        writer.write(OK)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nextra")  # an answer to nothing
        while True:
            await server.read_request(reader)
            writer.write(OK)

    async def main() -> None:
        async with Server(script) as server:
            pools = AsyncEndpointPools()
            assert (await fetch(pools, request(server.port)))[2] == b"ok"
            for _ in range(100):  # until the unasked-for bytes have arrived and retired the connection
                if pools.connections() == 0:
                    break
                await asyncio.sleep(0.01)
            assert (await fetch(pools, request(server.port)))[2] == b"ok", "never the stray answer"
            assert server.connections == 2
            await pools.aclose()

    run(main)


@both
def test_an_answer_followed_by_unasked_bytes_in_the_same_read_retires_the_connection():
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        while True:
            await server.read_request(reader)
            writer.write(OK + b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nextra")  # one write: one read
            await writer.drain()

    async def main() -> None:
        async with Server(script) as server:
            pools = AsyncEndpointPools()
            for _ in range(3):
                assert await fetch(pools, request(server.port)) == (200, {b"content-length": b"2"}, b"ok")
            assert server.connections == 3, "never reused after bytes nobody asked for"
            await pools.aclose()

    run(main)


@both
def test_a_read_timeout_names_itself_and_the_next_call_works():
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)
        if server.connections == 1:
            await asyncio.sleep(2)  # the first connection never answers in time
        writer.write(OK)
        await writer.drain()
        await asyncio.sleep(1)

    async def main() -> None:
        async with Server(script) as server:
            pools = AsyncEndpointPools()
            with pytest.raises(httpcore.ReadTimeout, match=r"0\.2s"):
                await fetch(pools, request(server.port, timeout=0.2))
            assert (await fetch(pools, request(server.port)))[2] == b"ok"
            await pools.aclose()

    run(main)


@both
def test_a_connect_failure_is_a_connect_error_naming_the_address():
    async def main() -> None:
        async with Server(keep_answering) as server:
            port = server.port
        await asyncio.sleep(0.05)
        with pytest.raises(httpcore.ConnectError, match=f"127.0.0.1:{port}"):
            await fetch(AsyncEndpointPools(), request(port))

    run(main)


def test_cancelling_mid_body_closes_the_connection():
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf ")
        await writer.drain()
        try:
            await reader.read(1)  # returns b"" when the client gives up and closes
        finally:
            server.requests.append((b"closed", {}, b""))

    async def main() -> None:
        async with Server(script) as server:
            pools = AsyncEndpointPools()
            answer = await pools.send(request(server.port))
            reading = asyncio.ensure_future(answer.stream.__aiter__().__anext__())
            assert await reading == b"half "
            second = asyncio.ensure_future(answer.stream.__aiter__().__anext__())
            await asyncio.sleep(0.02)
            second.cancel()
            with pytest.raises(asyncio.CancelledError):
                await second
            await answer.stream.aclose()
            assert pools.connections() == 0
            for _ in range(100):
                if server.requests[-1][0] == b"closed":
                    break
                await asyncio.sleep(0.01)
            assert server.requests[-1][0] == b"closed", "the server saw the connection close"

    run(main)


@both
def test_request_bodies_stream_chunked_and_by_length():
    async def chunks() -> AsyncIterator[bytes]:
        for part in (b"alpha ", b"", b"beta ", b"gamma"):
            yield part

    async def main() -> None:
        async with Server(keep_answering) as server:
            pools = AsyncEndpointPools()
            chunked = request(server.port, b"POST", body=chunks(), headers=[(b"transfer-encoding", b"chunked")])
            assert (await fetch(pools, chunked))[0] == 200
            sized = request(server.port, b"PUT", body=chunks(), headers=[(b"content-length", b"16")])
            assert (await fetch(pools, sized))[0] == 200
            assert [r[2] for r in server.requests] == [b"alpha beta gamma"] * 2
            assert server.connections == 1
            await pools.aclose()

    run(main)


@both
@pytest.mark.parametrize(
    ("headers", "body", "problem"),
    [
        ([(b"x-evil", b"a\r\nx-injected: 1")], b"", "CR, LF or NUL"),
        ([(b"bad name", b"v")], b"", "invalid header name"),
        ([(b"content-length", b"5")], b"abc", "Content-Length says 5"),
        ([(b"transfer-encoding", b"gzip")], b"", "unsupported Transfer-Encoding"),
        # both framings at once, in either order: a request smuggling shape, never sent
        ([(b"content-length", b"3"), (b"transfer-encoding", b"chunked")], b"abc", "both Content-Length and"),
        ([(b"transfer-encoding", b"chunked"), (b"content-length", b"3")], b"abc", "both Content-Length and"),
    ],
)
def test_requests_that_would_break_framing_are_refused_before_sending(headers: Any, body: bytes, problem: str):
    async def main() -> None:
        async with Server(keep_answering) as server:
            outbound = request(server.port, headers=headers)
            outbound.stream = httpx.ByteStream(body)
            with pytest.raises(httpcore.LocalProtocolError, match=problem):
                await fetch(AsyncEndpointPools(), outbound)
            await asyncio.sleep(0.05)
            assert server.requests == [], "nothing reached the server"

    run(main)


@both
def test_a_target_with_spaces_is_refused():
    async def main() -> None:
        async with Server(keep_answering) as server:
            with pytest.raises(httpcore.LocalProtocolError, match="invalid request target"):
                await fetch(AsyncEndpointPools(), request(server.port, target=b"/a b HTTP/1.1\r\nx: y"))

    run(main)


def test_through_the_client_errors_are_httpx_errors_and_answers_complete():
    """What callers see: httpx's exception classes, and responses with ``elapsed``, ``http_version`` and reason."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        while True:
            line, _, _ = await server.read_request(reader)
            if b"/broken" in line:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
                return
            writer.write(b"HTTP/1.1 202 Taken Gladly\r\ncontent-length: 2\r\n\r\nok")

    async def main() -> None:
        async with Server(script) as server:
            mesh = meshlib.Mesh(
                service="t",
                control_plane="",
                telemetry=False,
                discovery=StaticDiscovery({"svc": [Endpoint("127.0.0.1", server.port)]}),
            )
            async with mesh.async_client(timeout=5) as client:
                response = await client.post("http://svc/fine", content=b"{}")
                assert (response.status_code, response.reason_phrase, response.http_version) == (
                    202,
                    "Taken Gladly",
                    "HTTP/1.1",
                )
                assert response.elapsed.total_seconds() > 0
                # the mesh's verdict (a MeshError is an httpx.TransportError) names the engine's error
                with pytest.raises(httpx.TransportError, match="malformed HTTP response"):
                    await client.post("http://svc/broken", content=b"{}")
                with pytest.raises(httpx.TransportError, match="CR, LF or NUL"):
                    await client.post("http://svc/fine", content=b"{}", headers={"x-bad": "a\nb"})
            mesh.close()

    run(main)


def test_the_engine_is_the_lean_one_on_asyncio():
    async def main() -> None:
        async with Server(keep_answering) as server:
            pools = AsyncEndpointPools()
            await fetch(pools, request(server.port))
            stack = next(iter(pools.stacks().values()))
            assert all(type(c) is AsyncH1Connection for c in stack.idle)
            await pools.aclose()

    run(main)


def test_http2_or_another_event_loop_falls_back_to_httpcore_connections():
    """``http2=True`` (or trio, where the transport passes ``lean=False``) keeps httpcore's connection class."""

    async def main() -> None:
        async with Server(keep_answering) as server:
            for pools in (AsyncEndpointPools(lean=False), AsyncEndpointPools(http2=True)):
                for _ in range(3):
                    assert (await fetch(pools, request(server.port)))[2] == b"ok"
                stack = next(iter(pools.stacks().values()))
                assert stack.idle and all(type(c) is httpcore.AsyncHTTPConnection for c in stack.idle)
                await pools.aclose()

    run(main)


@both
def test_one_connection_honours_each_request_s_own_read_timeout():
    """The connection reuses one timer across requests: a shorter timeout after a longer one still fires on time,
    and a longer one after a shorter one does not fire early."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        while True:
            _, headers, _ = await server.read_request(reader)
            await asyncio.sleep(float(headers.get(b"x-delay", b"0")))
            writer.write(OK)

    def slow(port: int, delay: float, timeout: float) -> Outbound:
        return request(port, headers=[(b"x-delay", str(delay).encode())], timeout=timeout)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with Server(script) as server:
            pools = AsyncEndpointPools()
            # the timer armed for the first (0.4 s) fires while the second waits: it must re-arm, not fail it
            assert (await fetch(pools, slow(server.port, 0, 0.4)))[2] == b"ok"
            assert (await fetch(pools, slow(server.port, 0.9, 3.0)))[2] == b"ok", "no early timeout"
            assert (await fetch(pools, slow(server.port, 0, 10.0)))[2] == b"ok"
            started = loop.time()
            with pytest.raises(httpcore.ReadTimeout):
                await fetch(pools, slow(server.port, 5, 0.3))
            assert loop.time() - started < 2.0, "the shorter timeout fired on time, not at the armed 10 s"
            assert server.connections == 1
            await pools.aclose()

    run(main)


def test_a_pool_given_to_the_transports_may_answer_from_memory():
    """``pool=`` takes any object with httpcore's pool interface; httpcore's in-memory streams have no close."""
    from meshlib.client.async_transport import AsyncMeshTransport
    from meshlib.client.transport import MeshTransport

    def answer() -> httpcore.Response:
        return httpcore.Response(200, headers=[(b"content-length", b"2")], content=b"ok")

    class Pool:
        def handle_request(self, request: httpcore.Request) -> httpcore.Response:
            return answer()

        def close(self) -> None:
            pass

    class AsyncPool:
        async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
            return answer()

        async def aclose(self) -> None:
            pass

    mesh = meshlib.Mesh(
        service="t", control_plane="", telemetry=False, discovery=StaticDiscovery({"svc": [Endpoint("127.0.0.1", 9)]})
    )
    with meshlib.Client(mesh=mesh, transport=MeshTransport(mesh, pool=Pool())) as client:
        assert client.get("http://svc/x").text == "ok"

    async def main() -> str:
        async with meshlib.AsyncClient(mesh=mesh, transport=AsyncMeshTransport(mesh, pool=AsyncPool())) as client:
            return (await client.get("http://svc/x")).text

    assert run(main) == "ok"
    mesh.close()


@both
def test_an_answer_head_over_the_limit_is_refused():
    """A server streaming headers without end cannot make the client hold them: the head is bounded."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n")
        for i in range(20_000):  # about 600 KB of headers, never ending the head
            writer.write(b"x-filler-%05d: %s\r\n" % (i, b"v" * 16))
            if i % 500 == 0:
                await writer.drain()
        await asyncio.sleep(1)

    async def main() -> None:
        async with Server(script) as server:
            pools = AsyncEndpointPools()
            with pytest.raises(httpcore.RemoteProtocolError, match="over 102400 bytes"):
                await fetch(pools, request(server.port))
            assert pools.connections() == 0

    run(main)


def test_a_call_cancelled_while_connecting_leaves_nothing_behind():
    """Cancelled mid-handshake (here: a server that accepts and never speaks TLS), the connection is dropped, not
    put back in the stack as if it were idle."""
    import ssl

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await asyncio.sleep(5)

    async def main() -> None:
        async with Server(silent) as server:
            context = ssl.create_default_context()
            pools = AsyncEndpointPools(ssl_context=context)
            outbound = request(server.port)
            outbound.scheme = b"https"
            call = asyncio.ensure_future(fetch(pools, outbound))
            for _ in range(100):  # until the TCP connection is up and the handshake waits
                if server.connections:
                    break
                await asyncio.sleep(0.01)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            stack = next(iter(pools.stacks().values()))
            assert (stack.active, stack.idle) == (0, []), "nothing kept from a connection that never finished"

    run(main)


def test_a_compressed_answer_is_decoded_for_the_caller():
    """Answers read whole inside the attempt still go through httpx's decoders (gzip here)."""
    import gzip

    body = gzip.compress(b'{"hello": "mesh"}')

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        while True:
            await server.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-type: application/json\r\n")
            writer.write(b"content-length: %d\r\n\r\n%s" % (len(body), body))

    async def main() -> None:
        async with Server(script) as server:
            mesh = meshlib.Mesh(
                service="t",
                control_plane="",
                telemetry=False,
                discovery=StaticDiscovery({"svc": [Endpoint("127.0.0.1", server.port)]}),
            )
            async with mesh.async_client(timeout=5) as client:
                assert (await client.get("http://svc/x")).json() == {"hello": "mesh"}
            mesh.close()

    run(main)


@both
def test_idle_connections_past_the_keep_alive_expiry_are_not_reused():
    async def main() -> None:
        async with Server(keep_answering) as server:
            fresh = AsyncEndpointPools(keepalive_expiry=60)
            for _ in range(2):
                assert (await fetch(fresh, request(server.port)))[2] == b"ok"
            assert server.connections == 1, "reused while fresh"
            short = AsyncEndpointPools(keepalive_expiry=0.2)
            assert (await fetch(short, request(server.port)))[2] == b"ok"
            await asyncio.sleep(0.3)  # past the expiry (a lower bound: sleeping longer changes nothing)
            assert (await fetch(short, request(server.port)))[2] == b"ok"
            assert server.connections == 3, "a new connection once the idle one expired"
            await fresh.aclose()
            await short.aclose()

    run(main)
