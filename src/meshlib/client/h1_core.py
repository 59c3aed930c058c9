"""One HTTP/1.1 answer at a time, sans I/O: bytes in, state and body parts out. Both engines (``h1.py``, blocking
sockets; ``async_h1.py``, an asyncio protocol) feed it what they read and act on what it says; it has no socket,
no clock and no future, so every rule of reading an answer lives here once: framing, 1xx, HEAD/204/304, trailers,
the head's size bound, leniency where h11 is lenient, stray bytes, keep-alive, and every error's wording.

It is the object llhttp (httptools) calls back, so each parser callback is one Python call that updates plain
attributes; the engine looks at them after each ``feed``, never per callback. Errors are httpcore's classes, so
the mesh's verdicts and httpx's exceptions match every other path.
"""

from __future__ import annotations

import httpcore
import httptools

#: The most an answer's head may hold (status line and header lines, counted as sent); past it the answer is
#: refused. 100 KiB, as httpcore bounds h11 (its max_incomplete_event_size): what httpx accepts, both engines do.
MAX_HEAD_BYTES = 100 * 1024
#: A header line's bytes besides its name and value: ": " and CRLF.
LINE_OVERHEAD = 4
#: The version an answer's status line named, as httpx reports it in ``response.http_version``.
HTTP_VERSIONS = {"1.0": b"HTTP/1.0", "1.1": b"HTTP/1.1"}


class AnswerCore:
    """The answer being read on one connection (``start`` per request). After each ``feed``: ``head_done`` once
    the status and headers are in (``status``, ``reason``, ``version``, ``headers``, ``framed``); ``parts`` and
    ``buffered``, the body bytes not yet taken; ``complete`` at the answer's end, with ``reusable`` saying whether
    the connection may carry another request; ``stray`` once bytes nobody asked for arrived (never reuse it)."""

    __slots__ = (
        "_deferred",
        "_head_bytes",
        "_head_request",
        "_informational",
        "_parser",
        "_raw_head",
        "_raw_size",
        "_raw_tail",
        "_spare",
        "buffered",
        "complete",
        "framed",
        "head_done",
        "headers",
        "parts",
        "reason",
        "reusable",
        "status",
        "stray",
        "version",
        "where",
    )

    def __init__(self, where: str) -> None:
        self.where = where  # "host:port", for every error message
        self._parser: httptools.HttpResponseParser | None = None
        #: The parser of the last answer, when it ended cleanly on a kept connection: llhttp is then ready for the
        #: next answer, as uvicorn reuses one per connection (a new parser per request costs ~5% of a call's CPU).
        self._spare: httptools.HttpResponseParser | None = None
        self._raw_head: list[bytes] = []  # the head's reads so far: lenient_head needs them if llhttp refuses it
        self._raw_size = 0
        self._raw_tail = b""  # while deferred: the last 3 bytes kept, where a blank line may begin
        self._deferred: Exception | None = None  # llhttp refused a head that has not fully arrived yet
        self._head_bytes = 0
        self._head_request = False
        self._informational = False
        self.status = 0
        self.reason = b""
        self.version = b"HTTP/1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.parts: list[bytes] = []
        self.buffered = 0
        self.framed = False  # Content-Length or chunked (or no body): the end is known without the close
        self.head_done = False
        self.complete = False
        self.reusable = False
        self.stray = False

    def start(self, method: bytes) -> None:
        """A request went out: read its answer from the next bytes on."""
        parser, self._spare = self._spare, None
        self._parser = parser if parser is not None and self.reusable else httptools.HttpResponseParser(self)
        self._raw_head = []
        self._raw_size = 0
        self._deferred = None
        self._head_bytes = 0
        self._head_request = method == b"HEAD"
        self._informational = False
        self.headers = []
        self.parts = []
        self.buffered = 0
        self.head_done = self.complete = self.reusable = self.framed = False

    def take(self) -> bytes:
        """The body bytes that arrived since the last take, as one part."""
        parts, self.parts, self.buffered = self.parts, [], 0
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def feed(self, data: bytes) -> None:
        """Bytes read from the connection. Raises ``httpcore.RemoteProtocolError`` for an answer that cannot be
        read (the connection is then unusable); bytes after a whole answer only mark it ``stray``."""
        parser = self._parser
        if parser is None:  # no answer expected (idle, or the answer is whole): the connection cannot be trusted
            self.stray = True
            self.reusable = False
            return
        heading = not self.head_done
        if heading:  # kept as reads, joined only if leniency is needed: a trickling server costs no copies
            self._raw_head.append(data)
            self._raw_size += len(data)
            if self._deferred is not None:
                self._retry_leniently(data)
                return
        try:
            parser.feed_data(data)
        except Exception as exc:  # llhttp's errors, and ours raised from its callbacks
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, httpcore.ProtocolError):
                raise cause from None
            if heading and not self.head_done and self._head_bytes:  # past the status line: a header line
                self._deferred = exc  # llhttp refused may be one h11 forgives, once the whole head is in
                self._retry_leniently(None)
                return
            if self.complete:  # a whole answer, then garbage in the same read (a 204 with a body): the answer
                self.stray = True  # stands, as in httpx; the connection is never reused
                self.reusable = False
                return
            raise self._malformed(exc) from None
        if not self.head_done and self._raw_size > MAX_HEAD_BYTES:  # a line that never ends, 1xx after 1xx
            raise head_too_large(self.where)

    def ended(self) -> None:
        """The server closed the connection: a body delimited by the close is complete now; an answer cut short
        raises, naming what was missing."""
        self._parser = None
        self.reusable = False
        if self.complete:
            return
        if not self.head_done:
            if self._deferred is not None:
                raise self._malformed(self._deferred)
            raise httpcore.RemoteProtocolError(f"{self.where} closed the connection without an answer")
        if self.framed:
            raise httpcore.RemoteProtocolError(f"{self.where} closed the connection mid-body")
        self.complete = True

    # -- leniency ---------------------------------------------------------------------------------------------
    def _retry_leniently(self, data: bytes | None) -> None:
        """llhttp refused the head: once the whole head is in, parse it again as h11 would take it
        (``lenient_head``); until then keep its bytes, bounded as any head is. ``data``: the read just added
        (None: look at everything kept)."""
        reads = self._raw_head
        # only the new read, with the 3 bytes before it, can complete the blank line that ends the head
        window = b"".join(reads) if data is None else self._raw_tail + data
        complete = b"\r\n\r\n" in window
        self._raw_tail = window[-3:]
        if not complete:
            if self._raw_size > MAX_HEAD_BYTES:
                raise head_too_large(self.where)
            return  # the rest of the head is still to come (a fold split across reads)
        refusal, self._deferred = self._deferred, None
        fixed = lenient_head(b"".join(reads))
        if fixed is None:
            assert refusal is not None
            raise self._malformed(refusal)
        self._raw_head = []
        self._raw_size = 0
        self._head_bytes = 0
        self.headers = []  # nothing of the body was kept yet: it only starts after the head
        self._informational = False
        self._parser = parser = httptools.HttpResponseParser(self)
        try:
            parser.feed_data(fixed)
        except Exception as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, httpcore.ProtocolError):
                raise cause from None
            if self.complete:
                self.stray = True
                self.reusable = False
                return
            raise self._malformed(exc) from None

    def _malformed(self, exc: Exception) -> httpcore.RemoteProtocolError:
        return httpcore.RemoteProtocolError(f"malformed HTTP response from {self.where}: {exc}")

    # -- httptools callbacks ----------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.complete:  # a second answer in the same read: nobody asked for it
            self.stray = True
            self.reusable = False

    def on_status(self, status: bytes) -> None:
        if not self.complete:
            self.reason = status
            self._head_bytes = len(status) + 15  # "HTTP/1.1 200 " and CRLF

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:  # trailers (after the head) are dropped, never mixed into the headers
            return
        self._head_bytes += len(name) + len(value) + LINE_OVERHEAD
        if self._head_bytes > MAX_HEAD_BYTES:  # a hostile or broken server: bounded, as h11 bounds it
            raise head_too_large(self.where)
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        if parser is None or self.complete:
            return
        status = parser.get_status_code()
        if 100 <= status < 200:
            if status == 101:
                raise httpcore.RemoteProtocolError(f"{self.where} switched protocols; mesh hops do not upgrade")
            self._informational = True  # skipped: the real answer follows on the same connection
            self.headers = []
            return
        self.status = status
        self.version = HTTP_VERSIONS.get(parser.get_http_version(), b"HTTP/1.1")
        self.framed = is_framed(self.headers, status, self._head_request)
        self.head_done = True
        if self._head_request:  # llhttp cannot know a HEAD answer has no body: it ends here
            self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        if self._head_request:  # a HEAD answer carrying a body anyway: dropped, and the connection with it
            self.stray = True
            self.reusable = False
        elif self.head_done and not self.complete:
            self.parts.append(body)
            self.buffered += len(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        parser = self._parser
        if parser is None or self.complete:
            return
        keep = keep_alive_header(self.headers) if self._head_request else parser.should_keep_alive()
        self._parser = None  # nothing more may arrive until the next request
        self.complete = True
        self.reusable = keep
        if keep and not self._head_request:  # after a HEAD, llhttp still expects the body the head announced
            self._spare = parser


def head_too_large(where: str) -> httpcore.RemoteProtocolError:
    return httpcore.RemoteProtocolError(f"{where} sent an answer head over {MAX_HEAD_BYTES} bytes")


def is_framed(headers: list[tuple[bytes, bytes]], status: int, head_request: bool) -> bool:
    """Whether an answer's end is known without the connection closing: a Content-Length or chunked body, or no
    body at all (HEAD, 204, 304)."""
    if head_request or status in (204, 304):
        return True
    for name, value in headers:
        if len(name) in (14, 17):  # content-length, transfer-encoding
            lowered = name.lower()
            if lowered == b"content-length" or (lowered == b"transfer-encoding" and b"chunked" in value.lower()):
                return True
    return False


def keep_alive_header(headers: list[tuple[bytes, bytes]]) -> bool:
    """After a HEAD answer (which the parser cannot frame): the connection stays open unless it says close."""
    return not any(name.lower() == b"connection" and b"close" in value.lower() for name, value in headers)


def lenient_head(data: bytes) -> bytes | None:
    """The bytes of an answer whose head llhttp refused, made acceptable where h11 (httpx's parser) accepts them:
    obs-folded header lines unfolded (RFC 9112 §5.2: a user agent replaces the fold with a space), and a
    Content-Length repeated with one value (two headers of ``2``, or ``2, 2``) given once (RFC 9110 §8.6).
    None when neither applies, or the lengths disagree: the refusal stands. Anything else llhttp checks (header
    characters, framing) still is, on the rewritten head."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = data[:end].split(b"\r\n")
    out = [lines[0]]
    changed = False
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t") and len(out) > 1:  # a continuation of the previous header line
            out[-1] = out[-1].rstrip(b" \t") + b" " + line.strip(b" \t")
            changed = True
        else:
            out.append(line)
    at = [i for i, line in enumerate(out) if line.split(b":", 1)[0].strip().lower() == b"content-length"]
    if at:
        values = {part.strip() for i in at for part in out[i].split(b":", 1)[1].split(b",")}
        if len(at) > 1 or b"," in out[at[0]]:
            if len(values) != 1:
                return None  # lengths that disagree: a smuggling attempt or a broken server
            (value,) = values
            if not value.isdigit():
                return None
            out[at[0]] = b"Content-Length: " + value
            out = [line for i, line in enumerate(out) if i not in at[1:]]
            changed = True
    if not changed:
        return None
    return b"\r\n".join(out) + b"\r\n\r\n" + data[end + 4 :]
