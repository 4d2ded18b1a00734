"""A lean HTTP/2 server connection for gRPC: cleartext with prior knowledge (what gRPC's insecure channels speak),
frames read with struct, header blocks through header_blocks.py, flow control both ways, and bounds on
what one client may cost (a frame's size, a header block's, the answers it leaves unread).

Exists for speed: grpc.aio spent ~310 µs of server CPU on a unary call's transport alone, on a completion queue thread
of its own beside the loop; this runs on the worker's event loop as REST does (bench/NOTES.md, levers 60, 62, 65). The
app sees a stream as headers, then `data(chunk, end)` calls, then `reset()` if the client gives it up; it answers with
`respond(stream, head, body, tail)`."""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Callable
from typing import Protocol

import hpack

from .config import Limits
from .flow_control import Tally
from .header_blocks import BLOCK_FACTOR, Blocks

logger = logging.getLogger("torchship.oip")
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME = struct.Struct(">HBBBL")  # the length's 24 bits as 16 + 8, type, flags, stream id
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR, CANCEL, COMPRESSION_ERROR = 0, 1, 3, 6, 8, 9
REFUSED_STREAM, ENHANCE_YOUR_CALM = 7, 11
INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 4, 5, 6
DEFAULT_WINDOW, DEFAULT_FRAME, MAX_WINDOW = 65535, 16384, 2**31 - 1
STREAM_WINDOW = 1 << 20  # what a client may send on one stream before it must hear from us again
CONNECTION_WINDOW = 1 << 24  # ... and on all of them together
FRAME_LIMIT = 1 << 20  # the largest frame a client may send (SETTINGS_MAX_FRAME_SIZE)


class Handler(Protocol):
    """What the app returns for a new stream."""

    def data(self, chunk: bytes | bytearray, end: bool) -> None: ...  # a bytearray is the handler's to keep

    def reset(self) -> None: ...  # the client gave the stream up, or the connection went away


# The app: (connection, stream id, the request's headers (a repeated name keeps its last), their size as HTTP/2 counts
# it) -> the stream's handler; it may answer at once (a refusal).
App = Callable[["Connection", int, dict[bytes, bytes], int], Handler]


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return FRAME.pack(n >> 8, n & 0xFF, kind, flags, sid) + payload


class Stream:
    __slots__ = ("handler", "window", "queue", "receiving", "taken")

    def __init__(self, window: int, receiving: bool):
        self.handler: Handler | None = None
        self.window = window  # what we may still send on it
        self.queue: deque[list] = deque()  # [head, body, tail] waiting for the peer's window
        self.receiving = receiving  # the client may still send on it
        self.taken = 0  # bytes received on it since we last gave its window back


class Connection(asyncio.Protocol):
    def __init__(self, app: App, limits: Limits, tally: Tally, loop: asyncio.AbstractEventLoop | None = None):
        self.app, self.limits, self.tally = app, limits, tally
        self.loop = loop or asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.preface = False
        self.blocks = Blocks(limits.head_bytes)
        self.live: dict[int, Stream] = {}
        self.last_id = 0
        self.send_window, self.peer_window, self.peer_frame = DEFAULT_WINDOW, DEFAULT_WINDOW, DEFAULT_FRAME
        self.taken = 0  # bytes received since we last gave the connection's window back
        self.pending: tuple[int, bool, bytearray] | None = None  # a header block waiting for its CONTINUATION
        self.going_away = False
        self.quiet_since = self.loop.time()
        self.idle: asyncio.TimerHandle | None = None
        self.peer = ""
        self.counted = False
        self.out: list[bytes] = []  # frames to send when this turn of the loop ends

    # asyncio's side

    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = f"ipv6:[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"ipv4:{peer[0]}:{peer[1]}"
        self.tally.add(open_=1)
        self.counted = True
        transport.set_write_buffer_limits(high=self.limits.unsent_bytes)
        settings = struct.pack(
            ">HLHLHL",
            INITIAL_WINDOW_SIZE,
            STREAM_WINDOW,
            MAX_FRAME_SIZE,
            FRAME_LIMIT,
            MAX_HEADER_LIST_SIZE,
            self.limits.head_bytes,
        )
        grow = struct.pack(">L", CONNECTION_WINDOW - DEFAULT_WINDOW)
        self.send(frame(SETTINGS, 0, 0, settings) + frame(WINDOW_UPDATE, 0, 0, grow))
        self.idle = self.loop.call_later(self.limits.idle_timeout_s, self.check_idle)

    def connection_lost(self, exc) -> None:
        self.transport = None
        if self.counted:
            self.counted = False
            self.tally.add(open_=-1)
        if self.idle is not None:
            self.idle.cancel()
        live, self.live = self.live, {}
        for s in live.values():
            if s.handler is not None:
                s.handler.reset()

    def pause_writing(self) -> None:  # the client leaves our answers unread: read no more of its requests
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.preface:
            if buf[:24] != PREFACE[: len(buf)]:
                self.fail(PROTOCOL_ERROR, "not HTTP/2 with prior knowledge (the gRPC port speaks gRPC only)")
                return
            if len(buf) < 24:
                return
            del buf[:24]
            self.preface = True
        pos, n = 0, len(buf)
        while n - pos >= 9:
            hi, lo, kind, flags, sid = FRAME.unpack_from(buf, pos)
            length = hi << 8 | lo
            if length > FRAME_LIMIT:
                self.fail(FRAME_SIZE_ERROR, f"a frame of {length} bytes, over the {FRAME_LIMIT} announced")
                return
            if n - pos - 9 < length:
                break
            if kind == DATA and length > DEFAULT_FRAME and pos + 9 + length == n:
                # a large DATA frame that ends the buffer (a large message, read over several turns) is handed over as
                # the buffer itself, not copied twice (bench/NOTES.md, lever 72)
                del buf[: pos + 9]
                payload, self.buf = buf, bytearray()
                buf, pos, n = self.buf, 0, 0
            else:
                payload = bytes(buf[pos + 9 : pos + 9 + length])
                pos += 9 + length
            self.frame(kind, flags, sid & 0x7FFFFFFF, payload)
            if self.transport is None:
                return
        del buf[:pos]
        if self.taken >= CONNECTION_WINDOW // 2:
            self.send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", self.taken)))
            self.taken = 0

    # frames

    def frame(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        if self.pending is not None and kind != CONTINUATION:
            return self.fail(PROTOCOL_ERROR, "a header block was not continued")
        if kind == DATA:
            self.on_data(flags, sid, payload)
        elif kind == HEADERS:
            if sid == 0 or sid % 2 == 0:
                return self.fail(PROTOCOL_ERROR, "HEADERS on a stream a client cannot open")
            payload = self.unpad(flags, payload)
            if payload is not None and flags & PRIORITY_FLAG:
                payload = payload[5:]
            if payload is None:
                return
            if flags & END_HEADERS:
                self.on_headers(sid, payload, bool(flags & END_STREAM))
            else:
                self.pending = (sid, bool(flags & END_STREAM), bytearray(payload))
        elif kind == CONTINUATION:
            if self.pending is None or self.pending[0] != sid:
                return self.fail(PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
            self.pending[2].extend(payload)
            if len(self.pending[2]) > self.limits.head_bytes * BLOCK_FACTOR:
                return self.fail(ENHANCE_YOUR_CALM, "a header block over the limit")
            if flags & END_HEADERS:
                (sid, end, whole), self.pending = self.pending, None
                self.on_headers(sid, bytes(whole), end)
        elif kind == SETTINGS:
            if not flags & ACK:
                self.on_settings(payload)
        elif kind == PING:
            if not flags & ACK:
                self.send(frame(PING, ACK, 0, payload[:8]))
        elif kind == WINDOW_UPDATE:
            self.on_window(sid, int.from_bytes(payload[:4], "big") & 0x7FFFFFFF)
        elif kind == RST_STREAM:
            s = self.live.pop(sid, None)
            if s is not None and s.handler is not None:
                s.handler.reset()
            self.check_quiet()
        elif kind == GOAWAY:
            self.going_away = True
            self.check_quiet()
        elif kind == PUSH_PROMISE:
            self.fail(PROTOCOL_ERROR, "a client may not push")
        # PRIORITY and unknown types are ignored, as the protocol says

    def unpad(self, flags: int, payload: bytes) -> bytes | None:
        if not flags & PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            self.fail(PROTOCOL_ERROR, "padding longer than its frame")
            return None
        return payload[1 : len(payload) - payload[0]]

    def on_data(self, flags: int, sid: int, payload: bytes) -> None:
        self.taken += len(payload)
        s = self.live.get(sid)
        if s is None or not s.receiving:
            if sid == 0 or sid > self.last_id:
                self.fail(PROTOCOL_ERROR, "DATA on a stream that was never opened")
            return  # a stream we answered or reset already: its window still counts
        size = len(payload)
        payload = self.unpad(flags, payload)
        if payload is None:
            return
        end = bool(flags & END_STREAM)
        if end:
            s.receiving = False
        else:
            s.taken += size
            if s.taken >= STREAM_WINDOW // 2:
                self.send(frame(WINDOW_UPDATE, 0, sid, struct.pack(">L", s.taken)))
                s.taken = 0
        s.handler.data(payload, end)

    def on_headers(self, sid: int, data: bytes, end: bool) -> None:
        try:
            headers, size = self.blocks.decode(data)
        except hpack.OversizedHeaderListError:
            return self.fail(ENHANCE_YOUR_CALM, "a header block that decodes past the limit")
        except hpack.HPACKError:
            return self.fail(COMPRESSION_ERROR, "a header block HPACK cannot decode")
        s = self.live.get(sid)
        if s is not None:  # the client's trailers
            if s.receiving and end:
                s.receiving = False
                s.handler.data(b"", True)
            return
        if sid <= self.last_id:
            return  # trailers of a stream we answered already
        self.last_id = sid
        if self.going_away:
            self.send(frame(RST_STREAM, 0, sid, struct.pack(">L", REFUSED_STREAM)))
            return
        s = self.live[sid] = Stream(self.peer_window, not end)
        s.handler = self.app(self, sid, headers, size)
        if end and sid in self.live:
            s.handler.data(b"", True)

    def on_settings(self, payload: bytes) -> None:
        for i in range(0, len(payload) - len(payload) % 6, 6):
            key, value = struct.unpack_from(">HL", payload, i)
            if key == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    return self.fail(FLOW_CONTROL_ERROR, "an initial window over 2^31-1")
                delta, self.peer_window = value - self.peer_window, value
                for s in self.live.values():
                    s.window += delta
            elif key == MAX_FRAME_SIZE:
                self.peer_frame = max(DEFAULT_FRAME, min(value, FRAME_LIMIT))
        self.send(frame(SETTINGS, ACK, 0))
        self.flush_all()

    def on_window(self, sid: int, increment: int) -> None:
        if sid == 0:
            self.send_window += increment
            self.flush_all()
        elif (s := self.live.get(sid)) is not None:
            s.window += increment
            self.flush(sid, s)

    def send(self, data: bytes) -> None:
        """Frames go out together when this turn of the loop ends: the answers of one batch on one connection (a
        client's calls share it) cost one write, not one each (bench/NOTES.md, lever 65)."""
        if not self.out:
            self.loop.call_soon(self.flush_out)
        self.out.append(data)

    def flush_out(self) -> None:
        out, self.out = self.out, []
        if out and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    # the app's side

    def respond(self, sid: int, head: bytes | None = None, body: bytes = b"", tail: bytes | None = None) -> None:
        """Send a header block (HEAD), data (BODY) and the stream's last header block (TAIL, which ends it), in that
        order, each part optional; data beyond the peer's windows waits for its WINDOW_UPDATE."""
        s = self.live.get(sid)
        if s is None or self.transport is None:
            return  # reset by the client, or gone
        if not s.queue and len(body) <= min(self.send_window, s.window, self.peer_frame):
            parts = []
            if head is not None:
                parts.append(frame(HEADERS, END_HEADERS, sid, head))
            if body:
                parts.append(frame(DATA, 0, sid, body))
                self.send_window -= len(body)
                s.window -= len(body)
            if tail is not None:
                parts.append(frame(HEADERS, END_HEADERS | END_STREAM, sid, tail))
            self.send(b"".join(parts))
            if tail is not None:
                self.ended(sid, s)
            return
        s.queue.append([head, memoryview(body), tail])
        self.flush(sid, s)

    def flush(self, sid: int, s: Stream) -> None:
        write = self.send
        while s.queue:
            part = s.queue[0]
            if part[0] is not None:
                write(frame(HEADERS, END_HEADERS, sid, part[0]))
                part[0] = None
            while part[1]:
                n = min(self.send_window, s.window, self.peer_frame, len(part[1]))
                if n <= 0:
                    return
                write(frame(DATA, 0, sid, bytes(part[1][:n])))
                part[1] = part[1][n:]
                self.send_window -= n
                s.window -= n
            s.queue.popleft()
            if part[2] is not None:
                write(frame(HEADERS, END_HEADERS | END_STREAM, sid, part[2]))
                self.ended(sid, s)
                return

    def flush_all(self) -> None:
        for sid, s in list(self.live.items()):
            if s.queue and self.transport is not None:
                self.flush(sid, s)

    def ended(self, sid: int, s: Stream) -> None:
        """We sent the stream's end; a client still sending on it is told to stop (gRPC's server does the same)."""
        self.live.pop(sid, None)
        if s.receiving:
            self.send(frame(RST_STREAM, 0, sid, struct.pack(">L", NO_ERROR)))
        self.check_quiet()

    def check_quiet(self) -> None:
        if not self.live:
            self.quiet_since = self.loop.time()
            if self.going_away and self.transport is not None:
                self.flush_out()
                self.transport.close()

    def check_idle(self) -> None:
        """Close a connection that had no call for the idle timeout (nginx's keepalive_timeout); one timer a
        connection, looked at when due, so a call costs no timer."""
        if self.transport is None:
            return
        due = self.quiet_since + self.limits.idle_timeout_s
        if not self.live and self.loop.time() >= due:
            self.send(frame(GOAWAY, 0, 0, struct.pack(">LL", self.last_id, NO_ERROR) + b"idle"))
            self.flush_out()
            self.transport.close()
            return
        if self.live:
            self.idle = self.loop.call_later(self.limits.idle_timeout_s, self.check_idle)
        else:
            self.idle = self.loop.call_at(due, self.check_idle)

    def shutdown(self) -> None:
        """No new streams (GOAWAY); close once the ones open are answered."""
        if self.transport is not None and not self.going_away:
            self.send(frame(GOAWAY, 0, 0, struct.pack(">LL", self.last_id, NO_ERROR)))
        self.going_away = True
        self.check_quiet()

    def fail(self, code: int, why: str) -> None:
        """A connection error: GOAWAY saying why, then close (the streams open are reset)."""
        if self.transport is not None:
            logger.debug("HTTP/2 connection from %s closed: %s", self.peer, why)
            self.send(frame(GOAWAY, 0, 0, struct.pack(">LL", self.last_id, code) + why.encode()[:200]))
            self.flush_out()
            self.transport.close()
            self.transport = None
            self.connection_lost(None)
