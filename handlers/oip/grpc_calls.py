"""gRPC calls on HTTP/2 streams (http2.py): a call's messages unframed (and inflated, gzip or deflate, within the
message limit), its deadline (`grpc-timeout`), its status in the trailers, and the servicer context that the service's
methods (grpc.py) read and answer through: grpc.aio's names (`abort`, `peer`, `write`), so the methods read as before.
Exists for speed with http2.py (bench/NOTES.md, lever 65)."""

from __future__ import annotations

import asyncio
import enum
import logging
import socket
import struct
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote

from ..protocol.v2 import ProtocolError
from .compression import CODINGS, decompress
from .config import Limits
from .flow_control import Tally
from .header_blocks import block
from .http2 import Connection
from .sockets import Acceptor, Shares

if TYPE_CHECKING:
    from .handoff import Handoff, Link

logger = logging.getLogger("torchship.oip")
PREFIX = struct.Struct(">BL")  # a message's compressed flag and length
ACCEPTED = b"identity,deflate,gzip"
HEAD = b"\x88" + block((b"content-type", b"application/grpc"), (b"grpc-accept-encoding", ACCEPTED))  # \x88: 200
TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
MESSAGE_CHARS = 1024  # of a status message, at most


class Status(enum.IntEnum):
    """gRPC's status codes (grpc/doc/statuscodes.md)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ABORTED = 10
    RESOURCE_EXHAUSTED = 8
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


OK_TAIL = block((b"grpc-status", b"0"))


def trailers(status: Status, message: str, *, only: bool = False) -> bytes:
    """The status trailers; ONLY: a trailers-only answer, which also carries the response's headers."""
    fields = [(b"grpc-status", str(int(status)).encode())]
    if message:
        fields.append((b"grpc-message", quote(message[:MESSAGE_CHARS], safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")))
    return (HEAD if only else b"") + block(*[(n, v if isinstance(v, bytes) else v.encode()) for n, v in fields])


class Aborted(Exception):
    def __init__(self, status: Status, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Method:
    """One of the service's methods: FN(request or an async iterator of them, call) -> the response (unary), or None
    having written its answers (streaming); PARSE turns a message's bytes into the request. HANDED: a unary method whose
    calls another worker may run (handoff.py)."""

    fn: Callable[..., Awaitable]
    parse: Callable[[bytes], object]
    streaming: bool = False
    handed: bool = False


async def outcome(answer: Awaitable, name: str) -> tuple[Status, str, bytes | None]:
    """A method's answer as the call's status, message and response message (None: a streaming call's, written)."""
    try:
        response = await answer
    except Aborted as e:
        return e.status, e.message, None
    except asyncio.CancelledError:
        raise
    except Exception as e:  # a fault of ours: the client hears INTERNAL, the log has the traceback
        logger.exception("gRPC %s failed", name)
        return Status.INTERNAL, f"{type(e).__name__}: {str(e)[:200]}", None
    if response is None:
        return Status.OK, "", None
    return Status.OK, "", response if isinstance(response, bytes) else response.SerializeToString()


class Call:
    """One call: the http2 stream's handler on one side, the servicer context on the other."""

    def __init__(self, server: Server, conn: Connection, sid: int, method: Method, headers: dict[bytes, bytes]):
        self.server, self.conn, self.sid, self.method, self.headers = server, conn, sid, method, headers
        self.buf = bytearray()
        self.requests: list[bytes | bytearray] = []  # a unary call's message, as it came
        self.queue: asyncio.Queue | None = asyncio.Queue() if method.streaming else None
        self.task: asyncio.Task | None = None
        self.handed: tuple[Link, int] | None = None  # the link to the worker running it, and its number there
        self.headed = self.done = self.expired = self.counted = False
        self.timer: asyncio.TimerHandle | None = None
        self.coding = headers.get(b"grpc-encoding", b"identity").decode("latin-1")
        server.active += 1
        timeout = headers.get(b"grpc-timeout")
        if timeout:
            try:
                seconds = int(timeout[:-1]) * TIMEOUT_UNITS[timeout[-1:]]
            except (KeyError, ValueError):
                self.finish(Status.INVALID_ARGUMENT, f"grpc-timeout {timeout[:16]!r} is not a timeout")
                return
            self.timer = conn.loop.call_later(seconds, self.expire)
        if method.streaming:
            self.task = conn.loop.create_task(self.run(self.stream()))

    # the http2 side

    def data(self, chunk: bytes | bytearray, end: bool) -> None:
        if self.done:
            return
        buf = self.buf
        if not buf and isinstance(chunk, bytearray):
            self.buf = buf = chunk  # the connection's own buffer, handed over: kept, not copied
        else:
            buf += chunk
        limit = self.server.limits.max_body
        while len(buf) >= 5:
            compressed, length = PREFIX.unpack_from(buf)
            if length > limit:
                why = f"Received message larger than max ({length} vs. {limit})"  # grpcio's words
                return self.finish(Status.RESOURCE_EXHAUSTED, why)
            if len(buf) < 5 + length:
                break
            if len(buf) == 5 + length:  # the buffer is this message: it becomes the message (bench/NOTES.md, lever 72)
                del buf[:5]
                message, self.buf = buf, bytearray()
                buf = self.buf
            else:
                message = bytes(buf[5 : 5 + length])
                del buf[: 5 + length]
            if compressed:
                if self.coding not in CODINGS:
                    return self.finish(Status.UNIMPLEMENTED, f"a compressed message in grpc-encoding {self.coding!r}")
                try:
                    message = decompress(message, self.coding, limit)
                except ProtocolError as e:
                    status = Status.RESOURCE_EXHAUSTED if e.status == 413 else Status.INVALID_ARGUMENT
                    return self.finish(status, str(e))
            if self.queue is not None:
                self.queue.put_nowait(self.method.parse(message))
            elif self.requests:  # a unary call holds one: no more is kept
                return self.finish(Status.UNIMPLEMENTED, "a unary call takes one request message, not more")
            else:
                self.requests.append(message)
        if not end:
            return
        if buf:
            return self.finish(Status.INVALID_ARGUMENT, f"the stream ended inside a message ({len(buf)} bytes left)")
        if self.queue is not None:
            self.queue.put_nowait(None)
        elif not self.requests:
            self.finish(Status.UNIMPLEMENTED, "a unary call takes one request message, not none")
        else:
            handoff = self.server.handoff
            link = handoff.choose() if handoff is not None and self.method.handed else None
            if link is not None:
                self.handed = (link, link.send(self, self.requests.pop()))
            else:
                self.start(self.requests.pop())

    def start(self, message: bytes) -> None:
        """Run the unary call here."""
        self.handed = None
        handoff = self.server.handoff
        if handoff is not None and self.method.handed:
            handoff.started()
            self.counted = True
        self.task = self.conn.loop.create_task(self.run(self.method.fn(self.method.parse(message), self)))

    def answer(self, status: int, body: bytes) -> None:
        """What the worker that ran the call sent back: the response message, or the error's message."""
        if status == Status.OK:
            self.finish(Status.OK, "", body)
        else:
            self.finish(Status(status), body.decode("utf-8", "replace"))

    def reset(self) -> None:
        """The client cancelled the call or went away: its work is dropped (the pipeline counts it abandoned)."""
        if not self.done:
            self.done = True
            self.settle()
            self.stop_work()

    def expire(self) -> None:
        self.timer = None
        self.expired = True
        if self.task is not None and not self.done:
            self.task.cancel()  # run() answers DEADLINE_EXCEEDED
        elif not self.done:
            self.stop_work()  # a handed call: cancelled where it runs
            self.finish(Status.DEADLINE_EXCEEDED, "Deadline Exceeded")

    def stop_work(self) -> None:
        """The call's work is no longer wanted: cancelled here, or where it was handed."""
        if self.task is not None:
            self.task.cancel()
        elif self.handed is not None:
            link, number = self.handed
            link.cancel(number)

    async def run(self, answer: Awaitable) -> None:
        try:
            self.finish(*await outcome(answer, self.method.fn.__name__))
        except asyncio.CancelledError:
            if self.expired:
                self.finish(Status.DEADLINE_EXCEEDED, "Deadline Exceeded")

    async def stream(self) -> None:
        async def requests():
            while (request := await self.queue.get()) is not None:
                yield request

        await self.method.fn(requests(), self)

    def finish(self, status: Status, message: str, body: bytes | None = None) -> None:
        if self.done:
            return
        self.done = True
        self.settle()
        conn, sid = self.conn, self.sid
        if body is not None:
            conn.respond(sid, None if self.headed else HEAD, PREFIX.pack(0, len(body)) + body, OK_TAIL)
        elif self.headed:
            conn.respond(sid, tail=trailers(status, message))
        else:
            conn.respond(sid, tail=trailers(status, message, only=True))

    def settle(self) -> None:
        self.server.active -= 1
        if self.counted:
            self.counted = False
            self.server.handoff.ended()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # the servicer context

    def peer(self) -> str:
        return self.conn.peer

    def header(self, name: str) -> str | None:
        value = self.headers.get(name.encode())
        return None if value is None else value.decode("latin-1")

    async def abort(self, status: Status, message: str):
        raise Aborted(status, message)

    async def write(self, message) -> None:
        """One message of a streaming answer."""
        if self.done:
            raise asyncio.CancelledError
        body = message if isinstance(message, bytes) else message.SerializeToString()
        head, self.headed = (None if self.headed else HEAD), True
        self.conn.respond(self.sid, head, PREFIX.pack(0, len(body)) + body)


class Refused:
    """A stream answered at once (trailers only): what the client still sends on it is dropped."""

    def data(self, chunk: bytes, end: bool) -> None:
        pass

    def reset(self) -> None:
        pass


REFUSED = Refused()


class Server:
    """The gRPC side of one worker: calls on the connections it accepts from the shared listening socket."""

    def __init__(
        self, service: str, methods: dict[str, Method], limits: Limits, tally: Tally, handoff: Handoff | None = None
    ):
        self.methods = {f"/{service}/{name}".encode(): m for name, m in methods.items()}
        self.limits, self.tally, self.handoff = limits, tally, handoff
        if handoff is not None:
            handoff.method = next(m for m in methods.values() if m.handed)
        self.active = 0  # calls in progress in this worker
        self.connections: weakref.WeakSet[Connection] = weakref.WeakSet()  # the open ones
        self.acceptor: Acceptor | None = None

    def open(self, conn: Connection, sid: int, headers: dict[bytes, bytes], size: int):
        method = self.methods.get(headers.get(b":path", b""))
        refusal = None
        if headers.get(b":method") != b"POST":
            refusal = block((b":status", b"405"))
        elif not headers.get(b"content-type", b"").startswith(b"application/grpc"):
            refusal = block((b":status", b"415"))
        elif method is None:
            path = headers.get(b":path", b"").decode("latin-1")[:200]
            refusal = trailers(Status.UNIMPLEMENTED, f"Method not found: {path}", only=True)
        elif self.active >= self.limits.connections:
            why = f"this worker has {self.limits.connections} calls in progress, its limit: retry shortly"
            refusal = trailers(Status.RESOURCE_EXHAUSTED, why, only=True)
        elif size > self.limits.head_bytes:
            why = f"the call's metadata is over the {self.limits.head_bytes}-byte limit"
            refusal = trailers(Status.RESOURCE_EXHAUSTED, why, only=True)
        if refusal is not None:
            conn.respond(sid, tail=refusal)
            return REFUSED
        return Call(self, conn, sid, method, headers)

    def connection(self) -> Connection:
        conn = Connection(self.open, self.limits, self.tally)
        self.connections.add(conn)
        return conn

    def start(self, sock: socket.socket, shares: Shares | None = None, mine: Callable[[], int] = lambda: 0) -> None:
        self.acceptor = Acceptor(sock, self.connection, shares, mine)

    def close(self) -> None:
        """No new connections; each open one is told to go away (GOAWAY) and closes once its calls are answered."""
        if self.acceptor is not None:
            self.acceptor.close()
        if self.handoff is not None:
            self.handoff.close()
        for conn in list(self.connections):
            conn.shutdown()

    async def stop(self, grace: float) -> None:
        self.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while any(c.transport is not None for c in self.connections) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in self.connections:
            if conn.transport is not None:
                conn.transport.abort()
