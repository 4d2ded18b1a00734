"""The OIP server's HTTP/2 core (oip/http2.py) driven without sockets, as tests/unit/test_http11.py drives the
HTTP/1.1 one: a mock transport records the frames written, a mock loop runs the end-of-turn flush and the idle timer
by hand. The client side is `hpack` (python-hyper's HPACK, the server's own decoder) and hand-built frames; gRPC
clients themselves (tritonclient, grpcio) are in tests/test_triton_clients.py."""

from __future__ import annotations

import struct

import hpack
import pytest
from test_http11 import MockLoop, MockTransport

from torchship.handlers.oip import header_blocks, http2
from torchship.handlers.oip.config import Limits
from torchship.handlers.oip.flow_control import Tally
from torchship.handlers.oip.http2 import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PADDED,
    PING,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    Connection,
    frame,
)

REQUEST = [(":method", "POST"), (":scheme", "http"), (":path", "/s/M"), ("content-type", "application/grpc")]


class Loop(MockLoop):
    """The mock loop, with the end of a turn (call_soon) run when the test says."""

    def __init__(self):
        super().__init__()
        self.soon: list = []

    def call_soon(self, fn, *args):
        self.soon.append((fn, args))

    def turn(self) -> None:
        while self.soon:
            fn, args = self.soon.pop(0)
            fn(*args)


class Stream:
    def __init__(self, headers: dict, size: int):
        self.headers, self.size, self.chunks, self.ended, self.was_reset = headers, size, [], False, False

    def data(self, chunk: bytes, end: bool) -> None:
        self.chunks.append(chunk)
        self.ended = self.ended or end

    def reset(self) -> None:
        self.was_reset = True


class App:
    def __init__(self):
        self.streams: dict[int, Stream] = {}

    def __call__(self, conn, sid, headers, size):
        self.streams[sid] = Stream(headers, size)
        return self.streams[sid]


def connect(limits=Limits()):
    app, loop, transport = App(), Loop(), MockTransport()
    conn = Connection(app, limits, Tally(), loop=loop)
    conn.connection_made(transport)
    conn.data_received(PREFACE)
    loop.turn()
    transport.take()  # our SETTINGS and the connection's window: the first test reads them
    return conn, transport, loop, app


def frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """Every frame in DATA: (type, flags, stream, payload)."""
    out = []
    while data:
        hi, lo, kind, flags, sid = http2.FRAME.unpack_from(data)
        n = hi << 8 | lo
        out.append((kind, flags, sid & 0x7FFFFFFF, data[9 : 9 + n]))
        data = data[9 + n :]
    return out


def written(transport, loop) -> list[tuple[int, int, int, bytes]]:
    loop.turn()
    return frames(transport.take())


def test_the_server_speaks_first_then_acknowledges_settings_and_pings():
    app, loop, transport = App(), Loop(), MockTransport()
    conn = Connection(app, Limits(head_bytes=5000), Tally(), loop=loop)
    conn.connection_made(transport)
    (s_kind, _, _, settings), (w_kind, _, w_sid, grow) = written(transport, loop)
    assert s_kind == SETTINGS and w_kind == WINDOW_UPDATE and w_sid == 0
    announced = dict(struct.unpack_from(">HL", settings, i) for i in range(0, len(settings), 6))
    assert announced == {4: http2.STREAM_WINDOW, 5: http2.FRAME_LIMIT, 6: 5000}
    assert struct.unpack(">L", grow)[0] + http2.DEFAULT_WINDOW == http2.CONNECTION_WINDOW
    conn.data_received(PREFACE + frame(SETTINGS, 0, 0) + frame(PING, 0, 0, b"12345678"))
    assert written(transport, loop) == [(SETTINGS, ACK, 0, b""), (PING, ACK, 0, b"12345678")]


def test_not_http2_is_refused_with_goaway():
    app, loop, transport = App(), Loop(), MockTransport()
    conn = Connection(app, Limits(), Tally(), loop=loop)
    conn.connection_made(transport)
    conn.data_received(b"POST /v2/models/m/infer HTTP/1.1\r\n")
    *_, (kind, _, _, payload) = frames(transport.take())
    assert kind == GOAWAY and struct.unpack_from(">L", payload, 4)[0] == http2.PROTOCOL_ERROR
    assert transport.closed and not app.streams


def test_a_call_in_and_its_answer_out_in_one_write():
    conn, transport, loop, app = connect()
    encoder = hpack.Encoder()
    conn.data_received(
        frame(HEADERS, END_HEADERS, 1, encoder.encode(REQUEST + [("traceparent", "00-ab")]))
        + frame(DATA, 0, 1, b"hello ")
        + frame(DATA, END_STREAM, 1, b"world")
    )
    s = app.streams[1]
    assert s.headers[b":path"] == b"/s/M" and s.headers[b"traceparent"] == b"00-ab" and s.size > 0
    assert b"".join(s.chunks) == b"hello world" and s.ended
    transport.take()
    conn.respond(1, header_blocks.block((b":status", b"200")), b"answer", header_blocks.block((b"grpc-status", b"0")))
    assert transport.buffer == b""  # nothing until the turn ends
    out = written(transport, loop)
    assert [(k, f) for k, f, _, _ in out] == [(HEADERS, END_HEADERS), (DATA, 0), (HEADERS, END_HEADERS | END_STREAM)]
    decoder = hpack.Decoder()
    assert decoder.decode(out[0][3]) == [(":status", "200")] and out[1][3] == b"answer"
    assert decoder.decode(out[2][3]) == [("grpc-status", "0")]
    conn.respond(1, body=b"late")  # the stream is over: nothing more goes out on it
    assert written(transport, loop) == []


def test_an_answer_waits_for_the_clients_window():
    conn, transport, loop, app = connect()
    conn.data_received(frame(SETTINGS, 0, 0, struct.pack(">HL", http2.INITIAL_WINDOW_SIZE, 10)))
    conn.data_received(frame(HEADERS, END_HEADERS | END_STREAM, 1, hpack.Encoder().encode(REQUEST)))
    transport.take()
    conn.respond(1, header_blocks.block((b":status", b"200")), b"x" * 25, header_blocks.block((b"grpc-status", b"0")))
    out = [(k, len(p)) for k, _, _, p in written(transport, loop) if k != SETTINGS]
    assert out == [(HEADERS, 13), (DATA, 10)]  # the window's worth, no trailers yet
    conn.data_received(frame(WINDOW_UPDATE, 0, 1, struct.pack(">L", 10)))
    assert [(k, len(p)) for k, _, _, p in written(transport, loop) if k != SETTINGS] == [(DATA, 10)]
    conn.data_received(frame(WINDOW_UPDATE, 0, 1, struct.pack(">L", 100)))
    tail = written(transport, loop)
    assert [(k, f & END_STREAM, len(p)) for k, f, _, p in tail][:1] == [(DATA, 0, 5)]
    assert tail[-1][0] == HEADERS and tail[-1][1] & END_STREAM
    conn.respond(1, body=b"gone")
    assert written(transport, loop) == []


def test_a_header_block_of_table_indices_means_what_the_table_holds_now():
    """The decoded-block memory: the same bytes decode from memory while no block changes the table, and are decoded
    again once one has (indices move when the table grows), so the second :path below is read as the client meant."""
    conn, transport, loop, app = connect()
    encoder = hpack.Encoder()
    conn.data_received(frame(HEADERS, END_HEADERS | END_STREAM, 1, encoder.encode(REQUEST)))
    again = encoder.encode(REQUEST)
    assert header_blocks.indexed_only(again)  # the condition the memory relies on: every field now comes from the table
    for sid in (3, 5):
        conn.data_received(frame(HEADERS, END_HEADERS | END_STREAM, sid, again))
        assert app.streams[sid].headers[b":path"] == b"/s/M"
    assert again in conn.blocks.known
    moved = encoder.encode([(":method", "POST"), (":path", "/s/Other"), ("content-type", "application/grpc")])
    conn.data_received(frame(HEADERS, END_HEADERS | END_STREAM, 7, moved))
    assert app.streams[7].headers[b":path"] == b"/s/Other" and not conn.blocks.known
    same = encoder.encode(REQUEST)
    conn.data_received(frame(HEADERS, END_HEADERS | END_STREAM, 9, same))
    assert app.streams[9].headers[b":path"] == b"/s/M"


def test_a_block_in_continuations_and_padded_data():
    conn, transport, loop, app = connect()
    block = hpack.Encoder().encode(REQUEST)
    conn.data_received(
        frame(HEADERS, 0, 1, block[:3])
        + frame(CONTINUATION, 0, 1, block[3:6])
        + frame(CONTINUATION, END_HEADERS, 1, block[6:])
        + frame(DATA, PADDED | END_STREAM, 1, b"\x04body" + b"\0" * 4)
    )
    assert app.streams[1].headers[b":path"] == b"/s/M" and app.streams[1].chunks == [b"body"]
    assert conn.taken == 9  # padding counts against the window
    conn.data_received(frame(HEADERS, 0, 3, block[:3]) + frame(PING, 0, 0, b"12345678"))
    assert transport.closed and frames(transport.take())[-1][0] == GOAWAY  # a block cut by another frame


@pytest.mark.parametrize("alone", [True, False], ids=["ends-the-read", "followed-in-the-read"])
def test_a_large_frame_read_in_pieces_arrives_whole_and_stays_as_it_came(alone):
    """A DATA frame over the default frame size that ends the buffer is handed over as the buffer itself (not
    copied): the next frames must be read into another, leaving the handed one as it came."""
    conn, transport, loop, app = connect()
    encoder = hpack.Encoder()
    conn.data_received(frame(HEADERS, END_HEADERS, 1, encoder.encode(REQUEST)))
    conn.data_received(frame(HEADERS, END_HEADERS, 3, encoder.encode(REQUEST)))
    body = bytes(range(256)) * 1000
    big, after = frame(DATA, END_STREAM, 1, body), frame(DATA, END_STREAM, 3, b"\xff" * 20_000)
    reads = [big[:1000], big[1000:200_000], big[200_000:], after] if alone else [big[:1000], big[1000:] + after]
    for data in reads:
        conn.data_received(data)
    (chunk,) = app.streams[1].chunks
    assert isinstance(chunk, bytearray) is alone  # the condition this test is about: handed over, or copied
    assert chunk == body and app.streams[1].ended
    assert app.streams[3].chunks == [b"\xff" * 20_000] and app.streams[3].ended
    conn.data_received(frame(HEADERS, END_HEADERS | END_STREAM, 5, encoder.encode(REQUEST)))
    assert chunk == body and conn.taken == len(body) + 20_000


def test_windows_given_back_as_data_is_read():
    conn, transport, loop, app = connect()
    conn.data_received(frame(HEADERS, END_HEADERS, 1, hpack.Encoder().encode(REQUEST)))
    transport.take()
    chunk = b"\0" * (http2.STREAM_WINDOW // 4)
    for _ in range(2):
        conn.data_received(frame(DATA, 0, 1, chunk))
    assert (WINDOW_UPDATE, 0, 1, struct.pack(">L", 2 * len(chunk))) in written(transport, loop)
    for _ in range(6 * 8):  # past half the connection's window over more streams
        conn.data_received(frame(DATA, 0, 1, chunk))
    assert any(k == WINDOW_UPDATE and sid == 0 for k, _, sid, _ in written(transport, loop))


def test_reset_by_the_client_reaches_the_call_and_nothing_is_sent_after():
    conn, transport, loop, app = connect()
    conn.data_received(frame(HEADERS, END_HEADERS, 1, hpack.Encoder().encode(REQUEST)))
    conn.data_received(frame(RST_STREAM, 0, 1, struct.pack(">L", http2.CANCEL)))
    assert app.streams[1].was_reset
    transport.take()
    conn.respond(1, header_blocks.block((b":status", b"200")), b"x", header_blocks.block((b"grpc-status", b"0")))
    assert written(transport, loop) == []


def test_an_answer_before_the_request_ended_tells_the_client_to_stop():
    conn, transport, loop, app = connect()
    conn.data_received(frame(HEADERS, END_HEADERS, 1, hpack.Encoder().encode(REQUEST)))
    transport.take()
    conn.respond(1, tail=header_blocks.block((b":status", b"200"), (b"grpc-status", b"8")))
    out = written(transport, loop)
    assert out[-1] == (RST_STREAM, 0, 1, struct.pack(">L", http2.NO_ERROR))
    conn.data_received(frame(DATA, END_STREAM, 1, b"more"))  # still on its way: dropped, no error
    assert not transport.closed and app.streams[1].chunks == []


def test_idle_connections_close_and_busy_ones_stay():
    limits = Limits(idle_timeout_s=10)
    conn, transport, loop, app = connect(limits)
    conn.data_received(frame(HEADERS, END_HEADERS, 1, hpack.Encoder().encode(REQUEST)))
    loop.advance(25)
    assert not transport.closed  # a call in progress
    conn.respond(1, tail=header_blocks.block((b":status", b"200")))
    loop.turn()
    loop.advance(9)
    assert not transport.closed
    loop.advance(12)
    assert transport.closed and frames(transport.take())[-1][0] == GOAWAY


def test_shutdown_answers_what_it_holds_and_refuses_new_streams():
    conn, transport, loop, app = connect()
    encoder = hpack.Encoder()
    conn.data_received(frame(HEADERS, END_HEADERS | END_STREAM, 1, encoder.encode(REQUEST)))
    conn.shutdown()
    (kind, _, _, payload), *_ = written(transport, loop)
    assert kind == GOAWAY and struct.unpack_from(">L", payload)[0] == 1  # the last stream it will answer
    conn.data_received(frame(HEADERS, END_HEADERS | END_STREAM, 3, encoder.encode(REQUEST)))
    assert 3 not in app.streams
    assert (RST_STREAM, 0, 3, struct.pack(">L", http2.REFUSED_STREAM)) in written(transport, loop)
    assert not transport.closed
    conn.respond(1, tail=header_blocks.block((b":status", b"200")))
    assert transport.closed


@pytest.mark.parametrize(
    "data, code",
    [
        (frame(DATA, 0, 5, b"x"), http2.PROTOCOL_ERROR),  # a stream never opened
        (frame(HEADERS, END_HEADERS, 2, b""), http2.PROTOCOL_ERROR),  # an even stream: the server's to open
        (frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\x7f"), http2.COMPRESSION_ERROR),  # no such table entry
        (http2.FRAME.pack(0x7FFF, 0xFF, DATA, 0, 1), http2.FRAME_SIZE_ERROR),  # over the frame size announced
    ],
)
def test_protocol_errors_close_with_goaway_saying_which(data, code):
    conn, transport, loop, app = connect()
    transport.take()
    conn.data_received(data)
    (kind, _, _, payload), *_ = frames(transport.take())
    assert kind == GOAWAY and struct.unpack_from(">L", payload, 4)[0] == code and transport.closed


def test_mutated_client_streams_never_raise_and_end_answered_or_with_goaway():
    """2,000 mutations (bytes flipped, cut, repeated) of a client's stream of settings, a ping, calls with their data,
    a window update and a reset, fed in random pieces: the core never raises (a raise would be a traceback in the log
    and a dropped connection without a word); it closes with GOAWAY, or goes on."""
    import random

    rng = random.Random(36)
    encoder = hpack.Encoder()
    stream = frame(SETTINGS, 0, 0, struct.pack(">HL", http2.INITIAL_WINDOW_SIZE, 100)) + frame(PING, 0, 0, b"8" * 8)
    for sid in (1, 3, 5):
        stream += frame(HEADERS, END_HEADERS, sid, encoder.encode(REQUEST)) + frame(DATA, END_STREAM, sid, b"x" * 40)
    stream += frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", 1000)) + frame(RST_STREAM, 0, 3, struct.pack(">L", 8))
    closed = went_on = 0
    for _ in range(2000):
        data = bytearray(stream)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            kind = rng.random()
            if kind < 0.6:
                data[at] = rng.randrange(256)
            elif kind < 0.8:
                del data[at : at + rng.randint(1, 20)]
            else:
                data[at:at] = data[at : at + rng.randint(1, 30)]
        conn, transport, loop, app = connect()  # the preface is in: what follows is mutated
        pos = 0
        while pos < len(data) and not transport.closed:
            n = rng.randint(1, 64)
            conn.data_received(bytes(data[pos : pos + n]))
            pos += n
        for sid in list(conn.live):
            head, tail = header_blocks.block((b":status", b"200")), header_blocks.block((b"grpc-status", b"0"))
            conn.respond(sid, head, b"answer", tail)
        loop.turn()
        if transport.closed:
            closed += 1
            assert frames(transport.take())[-1][0] == GOAWAY
        else:
            went_on += 1
    assert closed > 100 and went_on > 100, (closed, went_on)  # the mutations reached both outcomes
