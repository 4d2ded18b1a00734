"""A lean HTTP/1.1 server for the Open Inference Protocol: httptools (llhttp, the parser uvicorn runs on) on an asyncio
protocol, one write per response, no task per request.

Exists for speed: on this 2-core machine uvicorn's ASGI cycle (a task, message dicts and two writes per request)
costs ~0.1 ms a request, and kserve's FastAPI layer ~0.5 ms, against ~0.15 ms for our whole model (bench/NOTES.md,
levers 37-39). What an ASGI server would have done for us is here too: keep-alive and HTTP/1.0, pipelined requests
answered in order, `Expect: 100-continue`, chunked bodies, a body limit enforced before the body is read, idle and
slow-header timeouts, and a 400 for anything the parser refuses.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus

import httptools

logger = logging.getLogger(__name__)
IDLE_TIMEOUT_S = 75  # a keep-alive connection with nothing to do is closed after this (nginx's default)
HEADER_TIMEOUT_S = 30  # a request must arrive whole within this once it has begun
MAX_HEADERS = 100
REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


@dataclass
class Request:
    method: str
    path: str
    query: str
    headers: dict[bytes, bytes] = field(default_factory=dict)  # names lower-cased; a repeated name keeps its last
    body: bytes = b""
    keep_alive: bool = True


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ((b"content-type", b"application/json"),)
    close: bool = False  # close the connection after this answer (a refused body may still be on its way)


# The app: called once per request with the request and a function that answers it, now or later (once only).
App = Callable[[Request, Callable[[Response], None]], None]


class Connection(asyncio.Protocol):
    def __init__(self, app: App, error: Callable[[int, str], Response], max_body: int):
        self.app, self.error, self.max_body = app, error, max_body
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.pending: deque[Request] = deque()  # pipelined requests waiting for the one being answered
        self.busy = False
        self.refused: Response | None = None  # an answer decided before the body was read (too large)
        self.timer: asyncio.TimerHandle | None = None
        self._url, self._body, self._size, self._headers = [], [], 0, {}

    # asyncio's side

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._arm(IDLE_TIMEOUT_S)

    def connection_lost(self, exc) -> None:
        self.transport = None
        if self.timer:
            self.timer.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(self.error(400, "protocol upgrades are not served here"))
        except httptools.HttpParserError as e:
            if self.refused is None:
                self._fail(self.error(400, f"malformed HTTP request: {str(e)[:100]}"))

    # the parser's side

    def on_message_begin(self) -> None:
        self._url, self._body, self._size, self._headers, self.refused = [], [], 0, {}, None
        self._arm(HEADER_TIMEOUT_S)

    def on_url(self, url: bytes) -> None:
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self._headers) >= MAX_HEADERS:
            raise httptools.HttpParserError("too many headers")
        self._headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        length = self._headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body:
            self.refused = self.error(413, f"request body of {length[:20].decode(errors='replace')} bytes is over the "
                                           f"{self.max_body}-byte limit")  # fmt: skip
            self._fail(self.refused)
            return
        if self._headers.get(b"expect", b"").lower() == b"100-continue" and self.transport:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > self.max_body:  # chunked uploads have no length to check first
            self.refused = self.error(413, f"request body is over the {self.max_body}-byte limit")
            self._fail(self.refused)
            raise httptools.HttpParserError("body over the limit")
        self._body.append(chunk)

    def on_message_complete(self) -> None:
        if self.refused is not None:
            return
        url = httptools.parse_url(b"".join(self._url))
        request = Request(
            method=self.parser.get_method().decode(),
            path=url.path.decode(errors="replace"),
            query=(url.query or b"").decode(errors="replace"),
            headers=self._headers,
            body=self._body[0] if len(self._body) == 1 else b"".join(self._body),
            keep_alive=self.parser.should_keep_alive(),
        )
        if self.busy:  # answers go out in the order requests came: hold this one, and read no more meanwhile
            self.pending.append(request)
            self.transport.pause_reading()
        else:
            self._dispatch(request)

    # answering

    def _dispatch(self, request: Request) -> None:
        self.busy = True
        if self.timer:
            self.timer.cancel()
        answered = []

        def reply(response: Response) -> None:
            if not answered:
                answered.append(True)
                self._send(request, response)

        try:
            self.app(request, reply)
        except Exception:
            logger.exception("request handling failed")
            reply(self.error(500, "the server failed on this request"))

    def _send(self, request: Request, response: Response) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        close = response.close or not request.keep_alive
        head = [b"HTTP/1.1 %d %s\r\n" % (response.status, REASONS.get(response.status, b"")),
                *(b"%s: %s\r\n" % h for h in response.headers),
                b"content-length: %d\r\n" % len(response.body),
                b"connection: close\r\n\r\n" if close else b"\r\n"]  # fmt: skip
        body = b"" if request.method == "HEAD" else response.body
        self.transport.write(b"".join(head) + body)
        self.busy = False
        if close:
            self.transport.close()
            return
        if self.pending:
            self._dispatch(self.pending.popleft())
            if not self.pending:
                self.transport.resume_reading()
        else:
            self._arm(IDLE_TIMEOUT_S)

    def _fail(self, response: Response) -> None:
        """Answer at once and close: the rest of what this client sends is not read."""
        if self.transport is None or self.transport.is_closing():
            return
        self.pending.clear()
        self._send(Request("", "", "", keep_alive=False), response)

    def _arm(self, seconds: float) -> None:
        if self.timer:
            self.timer.cancel()
        if self.transport is not None:
            self.timer = asyncio.get_running_loop().call_later(seconds, self._expire)

    def _expire(self) -> None:
        if self.transport is not None and not self.busy:
            self.transport.close()


async def serve(app: App, error: Callable[[int, str], Response], sock, max_body: int) -> asyncio.AbstractServer:
    """Start answering on a bound socket (listening starts here); stop with server.close()."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: Connection(app, error, max_body), sock=sock, backlog=2048)
