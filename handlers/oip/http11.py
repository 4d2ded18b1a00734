"""A lean HTTP/1.1 server for the Open Inference Protocol: httptools (llhttp, the parser uvicorn runs on) on an asyncio
protocol, one write per response, no task per request, and nginx's limits on what one client may cost.

Exists for speed: on this 2-core machine uvicorn's ASGI cycle (a task, message dicts and two writes per request)
costs ~0.1 ms a request, and kserve's FastAPI layer ~0.5 ms, against ~0.15 ms for our whole model (bench/NOTES.md,
levers 37-39). What an ASGI server and nginx would have done for us is here too (`Limits`): keep-alive and HTTP/1.0;
pipelined requests answered in order, by a loop, at any depth, even when a later one is malformed; `Expect:
100-continue` for HTTP/1.1 only, in turn; chunked bodies with their trailers discarded; a bounded request line and
header block (414, 431), counted as it arrives so no cost grows faster than its size; a body limit enforced before
the body is read (413); slow headers and stalled bodies answered 408; reading paused while unsent answers pass a
bound (flow control, as uvicorn's `FlowControl`); a cap on connections per worker; and a 400 for anything the parser
refuses.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from http import HTTPStatus

import httptools

from .config import Limits
from .deadlines import BODY, HEAD, IDLE, SEND, Deadline
from .flow_control import FlowControl, Tally
from .sockets import Acceptor, Shares

logger = logging.getLogger(__name__)
REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
LINGER_S = 2.0  # after a refusal, what the client still sends is read and dropped this long, so it sees the answer


@dataclass
class Request:
    method: str
    path: str
    query: str
    headers: dict[bytes, bytes] = field(default_factory=dict)  # names lower-cased; a repeated name keeps its last
    body: bytes = b""
    keep_alive: bool = True
    client: str = ""  # the peer's address, for the access log


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ((b"content-type", b"application/json"),)
    close: bool = False  # close the connection after this answer (a refused body may still be on its way)


# The app: called once per request with the request and a function that answers it, now or later (once only). It may
# return a function that drops the request, called if the client goes away before it is answered.
App = Callable[[Request, Callable[[Response], None]], Callable[[], None] | None]
Error = Callable[[int, str], Response]


class Connection(asyncio.Protocol):
    def __init__(self, app: App, error: Error, limits: Limits, tally: Tally, loop: asyncio.AbstractEventLoop = None):
        """LOOP: the running loop's clock and timers (a test's mock loop drives them by hand, as uvicorn's tests do)."""
        self.app, self.error, self.limits, self.tally = app, error, limits, tally
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.loop = loop or asyncio.get_running_loop()
        self.queue: deque[Request | Response] = deque()  # read and waiting, in arrival order; a Response is a refusal
        self.busy = False  # the app holds a request
        self.abandon: Callable[[], None] | None = None  # the app's way to drop the request it holds
        self.refused = False  # a refusal is queued: nothing more is parsed
        self.lingering = False
        self.flow = FlowControl(tally)
        self.stash: memoryview | None = None  # read but not yet parsed while the queue is full
        self.pumping = False
        self.continue_due = False  # a 100 Continue owed once the requests before this one are answered
        self.counted = False
        self.peer = ""
        # the message being parsed
        self.in_message = self.in_head = False
        self.begun = 0  # messages begun so far: tells a piece in which a new one began
        self.gap = 0  # bytes fed since the message began (head) or since its last body bytes (chunk framing, trailers)
        self.remaining = 0  # body bytes still due for a Content-Length body
        self.piece_body = 0
        self._url: list[bytes] = []
        self._body: list[bytes] = []
        self._headers: dict[bytes, bytes] = {}
        self.url_bytes = self.head_bytes = self.lines = self.size = 0
        self.clock = Deadline(self.loop, self._expire)  # the client's deadlines
        self.linger: asyncio.TimerHandle | None = None

    # asyncio's side

    def connection_made(self, transport) -> None:
        self.transport = self.flow.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else ""
        if self.tally.open >= self.limits.connections:
            busy = self.error(503, f"this worker holds {self.limits.connections} connections, its limit: retry shortly")
            transport.write(self._head(busy, close=True, extra=((b"retry-after", b"1"),)) + busy.body)
            transport.close()
            return
        self.tally.add(open_=1)
        self.counted = True
        transport.set_write_buffer_limits(high=self.limits.unsent_bytes)
        self.clock.start(IDLE, self.limits.header_timeout_s)  # a new connection owes its first request promptly

    def connection_lost(self, exc) -> None:
        self.transport = self.flow.transport = None
        if self.counted:
            self.flow.count(False)
            self.tally.add(open_=-1)
        self.clock.cancel()
        if self.linger:
            self.linger.cancel()
        self.queue.clear()
        self.stash = None
        if self.busy and self.abandon is not None:
            abandon, self.abandon = self.abandon, None
            abandon()

    def pause_writing(self) -> None:
        self.flow.writing_paused = True
        self.clock.start(SEND, self.limits.send_timeout_s)

    def resume_writing(self) -> None:
        self.flow.writing_paused = False
        self.clock.start(IDLE, self.limits.idle_timeout_s)  # the client reads again: its send clock stops
        self._pump()

    def data_received(self, data: bytes) -> None:
        if self.lingering or self.refused:
            return
        if self.clock.kind == BODY:
            self.clock.extend(self.limits.body_timeout_s)  # a read: the body's clock starts again
        self._parse(memoryview(data))
        self._pump()

    def eof_received(self) -> bool:
        return False  # the client went away (as uvicorn and nginx's proxy read it): close, dropping what it asked

    # parsing, in pieces no larger than the head limit wherever a head or chunk framing may be under way, so that an
    # oversized one is seen within one piece of its limit (httptools joins a split header value by repeated
    # concatenation: quadratic in its size if nothing stops it)

    def _parse(self, view: memoryview) -> None:
        pos, n, limits = 0, len(view), self.limits
        while pos < n and not self.refused:
            if len(self.queue) >= limits.pipelined or self.flow.writing_paused:
                self.stash = view[pos:]  # read no more until the answers before these go out
                return
            if self.in_message and not self.in_head and self.remaining:
                k = min(n - pos, self.remaining)  # a Content-Length body: up to its last byte, never past
            else:
                k = min(n - pos, limits.head_bytes + 1 - self.gap)
            began, url_before, self.piece_body = self.begun, self.url_bytes, 0
            try:
                self.parser.feed_data(view[pos : pos + k])
            except httptools.HttpParserUpgrade:
                self._refuse(400, "protocol upgrades are not served here")
                return
            except httptools.HttpParserError as e:
                if not self.refused:
                    self._refuse(400, f"malformed HTTP request: {str(e)[:100]}")
                return
            pos += k
            if self.begun != began or self.piece_body:
                self.gap = 0  # a message began inside the piece (its head so far is under one piece), or body came
            elif self.in_message:
                self.gap += k  # the whole piece was this message's head, or framing between its chunks
                if self.gap > limits.head_bytes:
                    if self.in_head:
                        self._refuse_head(line=self.url_bytes > url_before and not self.lines)
                    else:
                        self._refuse(400, f"chunk framing or trailers over {limits.head_bytes} bytes")

    def on_message_begin(self) -> None:
        self.in_message = self.in_head = True
        self.begun += 1
        self.gap = self.remaining = self.size = self.url_bytes = self.head_bytes = self.lines = 0
        self._url, self._body, self._headers = [], [], {}
        self.clock.start(HEAD, self.limits.header_timeout_s)

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self.url_bytes += len(url)
        if self.url_bytes > self.limits.head_bytes:
            self._refuse_head(line=True)
            raise httptools.HttpParserError("request line over the limit")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            return  # a trailer field (RFC 9112 §7.1.2): never merged into the headers acted on
        self.lines += 1
        self.head_bytes += len(name) + len(value) + 4
        if self.lines > self.limits.header_lines or self.url_bytes + self.head_bytes > self.limits.head_bytes:
            self._refuse_head(line=False)
            raise httptools.HttpParserError("header block over the limit")
        self._headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.gap = 0
        headers, version = self._headers, self.parser.get_http_version()
        if version == "1.0" and b"transfer-encoding" in headers:
            self._refuse(400, "Transfer-Encoding is not HTTP/1.0: send Content-Length (RFC 9112 §6.1)")
            raise httptools.HttpParserError("Transfer-Encoding in HTTP/1.0")
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or len(length) > 18 or int(length) > self.limits.max_body:
            self._refuse(
                413,
                f"request body of {length[:20].decode(errors='replace')} bytes is over the "
                f"{self.limits.max_body}-byte limit",
            )
            raise httptools.HttpParserError("body over the limit")
        self.remaining = int(length)
        self.clock.start(BODY, self.limits.body_timeout_s)
        if version != "1.0" and headers.get(b"expect", b"").lower() == b"100-continue":  # RFC 9110 §10.1.1
            self.continue_due = True

    def on_body(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self.piece_body += len(chunk)
        if self.remaining:
            self.remaining -= len(chunk)
        if self.size > self.limits.max_body:  # chunked uploads have no length to check first
            self._refuse(413, f"request body is over the {self.limits.max_body}-byte limit")
            raise httptools.HttpParserError("body over the limit")
        self._body.append(chunk)

    def on_message_complete(self) -> None:
        self.in_message = self.continue_due = False
        self.gap = self.remaining = 0
        if self.refused:
            return
        url = httptools.parse_url(b"".join(self._url))
        self.queue.append(
            Request(
                method=self.parser.get_method().decode(),
                path=url.path.decode(errors="replace"),
                query=(url.query or b"").decode(errors="replace"),
                headers=self._headers,
                body=self._body[0] if len(self._body) == 1 else b"".join(self._body),
                keep_alive=self.parser.should_keep_alive(),
                client=self.peer,
            )
        )

    # answering: one loop, so that any depth of pipelining costs no stack

    def _pump(self) -> None:
        if self.pumping:
            return  # a synchronous answer inside the loop below: the loop goes on from there
        self.pumping = True
        try:
            while self.transport is not None and not self.transport.is_closing() and not self.lingering:
                if self.queue and not self.busy and not self.flow.writing_paused:
                    item = self.queue.popleft()
                    if isinstance(item, Response):
                        self._write(item, close=True, head_only=False)
                        self._linger()
                        return
                    self._dispatch(item)
                elif (
                    self.stash is not None
                    and not self.refused
                    and len(self.queue) < self.limits.pipelined
                    and not self.flow.writing_paused
                ):
                    view, self.stash = self.stash, None
                    self._parse(view)
                else:
                    break
            if self.transport is None or self.transport.is_closing() or self.lingering:
                return
            if self.continue_due and not self.busy and not self.queue:
                self.continue_due = False
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.flow.read(self.stash is None and not self.refused, refused=self.refused)
            if self.flow.writing_paused:
                return
            if self.in_message:
                self.clock.start(
                    HEAD if self.in_head else BODY,
                    self.limits.header_timeout_s if self.in_head else self.limits.body_timeout_s,
                    keep=True,
                )
            elif not self.busy and not self.queue:
                self.clock.start(IDLE, self.limits.idle_timeout_s)
        finally:
            self.pumping = False

    def _dispatch(self, request: Request) -> None:
        self.busy = True
        answered = []

        def reply(response: Response) -> None:
            if answered:
                return
            answered.append(True)
            self.busy, self.abandon = False, None
            if self.transport is None or self.transport.is_closing():
                return
            self._write(response, close=response.close or not request.keep_alive, head_only=request.method == "HEAD")
            if response.close or not request.keep_alive:
                self.transport.close()
                return
            self._pump()

        try:
            abandon = self.app(request, reply)
        except Exception:
            logger.exception("request handling failed")
            return reply(self.error(500, "the server failed on this request"))
        if not answered:
            self.abandon = abandon

    def _head(self, response: Response, *, close: bool, extra: tuple = ()) -> bytes:
        return b"".join(
            [
                b"HTTP/1.1 %d %s\r\n" % (response.status, REASONS.get(response.status, b"")),
                *(b"%s: %s\r\n" % h for h in (*response.headers, *extra)),
                b"content-length: %d\r\n" % len(response.body),
                b"connection: close\r\n\r\n" if close else b"\r\n",
            ]
        )

    def _write(self, response: Response, *, close: bool, head_only: bool) -> None:
        self.transport.write(self._head(response, close=close) + (b"" if head_only else response.body))

    def _refuse(self, status: int, message: str) -> None:
        """Answer in turn, after what was read before it, then close: nothing after it is parsed or read."""
        if self.refused:
            return
        self.refused = True
        self.stash = None
        self.continue_due = False
        self.flow.count(False)
        self.queue.append(replace(self.error(status, message), close=True))
        if self.transport is not None:
            self.flow.read(False, refused=True)

    def _refuse_head(self, *, line: bool) -> None:
        if line:  # the request line itself is still arriving
            self._refuse(414, f"request line over {self.limits.head_bytes} bytes")
        else:
            self._refuse(
                431, f"request header fields over {self.limits.head_bytes} bytes or {self.limits.header_lines} lines"
            )

    def _linger(self) -> None:
        """The refusal is written: send FIN, drop what still arrives for a moment, then close (nginx's lingering
        close), so a client still uploading reads the answer instead of a reset."""
        self.lingering = True
        self.queue.clear()
        self.clock.cancel()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.flow.read(True, refused=self.refused)
        self.linger = self.loop.call_later(LINGER_S, self._close)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _expire(self, kind: str, now: float) -> bool:
        """KIND's deadline has passed: act on it, or say False when it is not the client's fault (yet)."""
        if self.transport is None or self.lingering:
            return True
        if kind not in (SEND, IDLE) and self.stash is not None or kind == IDLE and (self.busy or self.queue):
            return False  # we are the ones holding things up: look again later
        if kind == SEND:
            logger.info("a client took none of its answers for %gs: connection dropped", self.limits.send_timeout_s)
            self.transport.abort()
        elif kind == IDLE:
            self.transport.close()
        elif kind in (HEAD, BODY) and self.in_message:
            what = "header" if kind == HEAD else "body"
            limit = self.limits.header_timeout_s if kind == HEAD else self.limits.body_timeout_s
            self._refuse(408, f"the request's {what} did not arrive within {limit:g}s")
            self._pump()
        return True


def serve(
    app: App,
    error: Error,
    sock,
    limits: Limits = Limits(),
    tally: Tally | None = None,
    shares: Shares | None = None,
    held: Callable[[], int] | None = None,
) -> Acceptor:
    """Start answering on a listening socket, shared with other workers (SHARES: their connection counts, against
    which HELD, this worker's, is compared) or not; stop accepting with .close()."""
    tally = tally or Tally()  # this worker's, shared by its connections
    return Acceptor(sock, lambda: Connection(app, error, limits, tally), shares, held or (lambda: tally.open))
