"""The HTTP/1.1 answer core (client/h1_core.py), byte for byte and with no socket: every rule both engines follow
(framing, 1xx, HEAD/204/304, trailers, leniency where h11 is lenient, bounds, stray bytes, keep-alive, error
wording), each case fed whole, byte by byte, and split at every position into two reads; every way of cutting the
same bytes must give the same outcome. The same rules over real sockets, for both engines, are in
test_h1_conformance.py and test_httpx_fidelity.py."""

from __future__ import annotations

from dataclasses import dataclass

import httpcore
import pytest

from meshlib.client.h1_core import MAX_HEAD_BYTES, AnswerCore

WHERE = "10.0.0.7:8080"


@dataclass(frozen=True)
class Outcome:
    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    complete: bool
    reusable: bool
    version: bytes = b"HTTP/1.1"


def read(method: bytes, reads: list[bytes], close: bool) -> Outcome | str:
    """What the core makes of ``reads`` (then the server's close, if ``close``): the answer, or the error text."""
    core = AnswerCore(WHERE)
    core.start(method)
    body: list[bytes] = []
    try:
        for data in reads:
            core.feed(data)
            if core.parts:
                body.append(core.take())
        if close:
            core.ended()
    except httpcore.RemoteProtocolError as exc:
        return f"error: {exc}"
    body.append(core.take())
    return Outcome(core.status, tuple(core.headers), b"".join(body), core.complete, core.reusable, core.version)


def cuts(data: bytes) -> list[list[bytes]]:
    """The same bytes as one read, one byte per read, and two reads split at every position."""
    ways = [[data], [data[i : i + 1] for i in range(len(data))]]
    ways += [[data[:i], data[i:]] for i in range(1, len(data))]
    return ways


def outcome(method: bytes, data: bytes, close: bool = False) -> Outcome | str:
    """The one outcome of ``data`` however it is cut into reads (asserted)."""
    results = {read(method, way, close) for way in cuts(data)}
    assert len(results) == 1, f"the outcome depends on how the reads fall: {results}"
    return results.pop()


def ok(body: bytes, *headers: tuple[bytes, bytes], status: int = 200, reusable: bool = True, **kw: object) -> Outcome:
    return Outcome(status, headers, body, True, reusable, **kw)  # type: ignore[arg-type]


CL5 = (b"Content-Length", b"5")

CASES = {
    "a Content-Length body": (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", False, ok(b"hello", CL5)),
    "a chunked body, its trailers dropped": (
        b"GET",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nX-T: t\r\n\r\n",
        False,
        ok(b"hello world", (b"Transfer-Encoding", b"chunked")),
    ),
    "a body ended by the close": (
        b"GET",
        b"HTTP/1.1 200 OK\r\n\r\nuntil the end",
        True,
        ok(b"until the end", reusable=False),
    ),
    "1xx answers skipped": (
        b"GET",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        False,
        ok(b"ok", (b"Content-Length", b"2")),
    ),
    "an upgrade refused": (
        b"GET",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
        False,
        f"error: {WHERE} switched protocols; mesh hops do not upgrade",
    ),
    "HEAD: no body, kept": (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", False, ok(b"", CL5)),
    "HEAD with Connection: close": (
        b"HEAD",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\n",
        False,
        ok(b"", CL5, (b"Connection", b"close"), reusable=False),
    ),
    "HEAD answered with a body anyway: dropped, with the connection": (
        b"HEAD",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        False,
        ok(b"", CL5, reusable=False),
    ),
    "204: no body": (b"GET", b"HTTP/1.1 204 No Content\r\n\r\n", False, ok(b"", status=204)),
    "304 with a length: no body": (
        b"GET",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
        False,
        ok(b"", (b"Content-Length", b"10"), status=304),
    ),
    "204 with stray bytes: the answer stands, the connection goes": (
        b"GET",
        b"HTTP/1.1 204 No Content\r\n\r\nhello",
        False,
        ok(b"", status=204, reusable=False),
    ),
    "a second answer nobody asked for": (
        b"GET",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno",
        False,
        ok(b"ok", (b"Content-Length", b"2"), reusable=False),
    ),
    "Connection: close": (
        b"GET",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        False,
        ok(b"hello", CL5, (b"Connection", b"close"), reusable=False),
    ),
    "HTTP/1.0: its version, not kept": (
        b"GET",
        b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        False,
        ok(b"hello", CL5, reusable=False, version=b"HTTP/1.0"),
    ),
    "HTTP/1.0 with keep-alive: kept": (
        b"GET",
        b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello",
        False,
        ok(b"hello", CL5, (b"Connection", b"keep-alive"), version=b"HTTP/1.0"),
    ),
    "an obs-folded header unfolded, as h11 does": (
        b"GET",
        b"HTTP/1.1 200 OK\r\nX-A: one\r\n  two\r\nContent-Length: 2\r\n\r\nok",
        False,
        ok(b"ok", (b"X-A", b"one two"), (b"Content-Length", b"2")),
    ),
    "a Content-Length given twice alike": (
        b"GET",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
        False,
        ok(b"ok", (b"Content-Length", b"2")),
    ),
    "a Content-Length of 2, 2": (
        b"GET",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
        False,
        ok(b"ok", (b"Content-Length", b"2")),
    ),
    "lengths that disagree": (
        b"GET",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!",
        False,
        "error: malformed HTTP response from 10.0.0.7:8080",
    ),
    "a body cut short by the close": (
        b"GET",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel",
        True,
        f"error: {WHERE} closed the connection mid-body",
    ),
    "a chunked body cut short by the close": (
        b"GET",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
        True,
        f"error: {WHERE} closed the connection mid-body",
    ),
    "a head cut short by the close": (
        b"GET",
        b"HTTP/1.1 200 OK\r\nContent-Len",
        True,
        f"error: {WHERE} closed the connection without an answer",
    ),
    "a close before any answer": (b"GET", b"", True, f"error: {WHERE} closed the connection without an answer"),
    "not HTTP at all": (b"GET", b"SSH-2.0-OpenSSH_9.2\r\n", False, "error: malformed HTTP response from"),
    "a folded header that is not h11's either (no header before it)": (
        b"GET",
        b"HTTP/1.1 200 OK\r\n folded\r\nContent-Length: 2\r\n\r\nok",
        False,
        "error: malformed HTTP response from",
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_every_rule_once_however_the_reads_fall(case: str):
    method, data, close, expected = CASES[case]
    got = outcome(method, data, close)
    if isinstance(expected, str):
        assert isinstance(got, str) and got.startswith(expected), got
    else:
        assert got == expected


def test_a_head_over_the_bound_is_refused_counted_as_h11_counts_it():
    header = b"X-Big: " + b"a" * (MAX_HEAD_BYTES - 60) + b"\r\n"  # 40 bytes to spare, with the rest
    fits = b"HTTP/1.1 200 OK\r\n" + header + b"Content-Length: 2\r\n\r\nok"
    assert read(b"GET", [fits], False) == ok(b"ok", (b"X-Big", header[7:-2]), (b"Content-Length", b"2"))
    over = b"HTTP/1.1 200 OK\r\n" + header + b"X-More: " + b"b" * 40 + b"\r\n\r\n"
    for way in ([over], [over[:50_000], over[50_000:]]):
        assert read(b"GET", way, False) == f"error: {WHERE} sent an answer head over {MAX_HEAD_BYTES} bytes"


def test_a_header_line_that_never_ends_is_bounded_too():
    """llhttp alone would buffer one endless header line without limit."""
    core = AnswerCore(WHERE)
    core.start(b"GET")
    core.feed(b"HTTP/1.1 200 OK\r\nX-Endless: ")
    with pytest.raises(httpcore.RemoteProtocolError, match="answer head over"):
        for _ in range(MAX_HEAD_BYTES // 1024 + 2):
            core.feed(b"a" * 1024)


def test_a_fold_trickled_a_byte_at_a_time_is_still_bounded():
    core = AnswerCore(WHERE)
    core.start(b"GET")
    core.feed(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n 2\r\n")  # refused by llhttp: held until the head is whole
    with pytest.raises(httpcore.RemoteProtocolError, match="answer head over"):
        for _ in range(MAX_HEAD_BYTES + 10):
            core.feed(b"X")


def test_bytes_while_no_answer_is_expected_mark_the_connection_stray():
    core = AnswerCore(WHERE)
    core.start(b"GET")
    core.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert core.complete and core.reusable and not core.stray
    core.feed(b"surprise")
    assert core.stray and not core.reusable


def test_one_core_reads_answer_after_answer_on_a_kept_connection():
    core = AnswerCore(WHERE)
    for n in range(3):
        core.start(b"GET")
        core.feed(b"HTTP/1.1 200 OK\r\nX-N: %d\r\nContent-Length: 1\r\n\r\n%d" % (n, n))
        assert (core.headers[0], core.take(), core.reusable) == ((b"X-N", b"%d" % n), b"%d" % n, True)


def test_a_large_body_arrives_in_parts_with_a_count_for_flow_control():
    core = AnswerCore(WHERE)
    core.start(b"GET")
    core.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n")
    assert core.head_done and not core.complete and core.buffered == 0
    for _ in range(3):
        core.feed(b"x" * 100_000)
    assert core.buffered == 300_000 and core.complete
    assert len(core.take()) == 300_000 and core.buffered == 0
