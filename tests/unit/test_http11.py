"""The OIP server's HTTP/1.1 core driven without sockets, as uvicorn's tests/protocols/test_http.py drives its
protocols: a mock transport records what is written and whether reading is paused, and a mock loop's clock is moved
by hand, so every deadline is exact and instant. tests/test_http_limits.py keeps what only real sockets show."""

from __future__ import annotations

import heapq
import itertools
import json

import pytest

from torchship.handlers.oip.config import Limits
from torchship.handlers.oip.flow_control import Tally
from torchship.handlers.oip.http11 import Connection, Request, Response


class MockTransport:
    def __init__(self):
        self.buffer = b""
        self.reading = True
        self.closed = self.aborted = self.eof = False
        self.high = None

    def get_extra_info(self, name):
        return ("127.0.0.1", 40000) if name == "peername" else None

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.buffer += data

    def take(self) -> bytes:
        out, self.buffer = self.buffer, b""
        return out

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        self.high = high

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True


class MockTimer:
    def __init__(self):
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class MockLoop:
    """A clock that moves only when told, and the timers due by then."""

    def __init__(self):
        self.now = 1000.0
        self.timers: list = []
        self.order = itertools.count()

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, fn) -> MockTimer:
        timer = MockTimer()
        heapq.heappush(self.timers, (when, next(self.order), timer, fn))
        return timer

    def call_later(self, delay: float, fn) -> MockTimer:
        return self.call_at(self.now + delay, fn)

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while self.timers and self.timers[0][0] <= end:
            when, _, timer, fn = heapq.heappop(self.timers)
            self.now = max(self.now, when)
            if not timer.cancelled:
                fn()
        self.now = end


class App:
    """Holds every request it gets; answers at once when told to, else when the test says."""

    def __init__(self, at_once: bool = True):
        self.at_once, self.requests, self.replies, self.abandoned = at_once, [], [], 0

    def __call__(self, request: Request, reply):
        self.requests.append(request)
        if self.at_once:
            return reply(Response(200, json.dumps({"path": request.path, "body": len(request.body)}).encode()))
        self.replies.append(reply)
        return self.abandon

    def abandon(self) -> None:
        self.abandoned += 1


def error(status: int, message: str, *, close: bool = False, headers: tuple = ()) -> Response:
    return Response(status, json.dumps({"error": message}).encode(), headers=headers, close=close)


def connect(app=None, limits=Limits(), tally=None) -> tuple[Connection, MockTransport, MockLoop, App]:
    app, loop, transport = app or App(), MockLoop(), MockTransport()
    conn = Connection(app, error, limits, tally or Tally(), loop=loop)
    conn.connection_made(transport)
    return conn, transport, loop, app


def answers(data: bytes) -> list[tuple[int, dict, bytes]]:
    """Every whole answer in DATA: (status, headers, body)."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        n = int(headers.get("content-length", 0))
        out.append((int(lines[0].split()[1]), headers, rest[:n]))
        data = rest[n:]
    return out


def get(path: str = "/v2/health/live", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


# parsing and answering


def test_a_request_is_answered_once_with_its_length_and_the_connection_stays_open():
    conn, transport, _, app = connect()
    conn.data_received(post("/v2/models/m/infer", b"12345"))
    [(status, headers, body)] = answers(transport.take())
    assert status == 200 and headers["content-length"] == str(len(body)) and json.loads(body)["body"] == 5
    assert "connection" not in headers and not transport.closed and app.requests[0].client == "127.0.0.1:40000"


def test_a_request_split_into_single_bytes_is_one_request():
    conn, transport, _, app = connect()
    for b in post("/x", b"abc"):
        conn.data_received(bytes([b]))
    assert len(app.requests) == 1 and app.requests[0].body == b"abc" and answers(transport.take())[0][0] == 200


def test_pipelined_requests_are_answered_in_order_one_at_a_time():
    conn, transport, _, app = connect(App(at_once=False))
    conn.data_received(get("/a") + get("/b") + get("/c"))
    assert [r.path for r in app.requests] == ["/a"]  # the next waits for this one's answer
    app.replies[0](Response(200, b"a"))
    assert [r.path for r in app.requests] == ["/a", "/b"]
    app.replies[1](Response(200, b"b"))
    app.replies[2](Response(200, b"c"))
    assert [body for _, _, body in answers(transport.take())] == [b"a", b"b", b"c"]


def test_a_malformed_request_behind_good_ones_is_refused_in_turn_and_closes():
    conn, transport, loop, app = connect()
    conn.data_received(get("/a") + b"NONSENSE\r\n\r\n" + get("/never"))
    out = answers(transport.take())
    assert [s for s, _, _ in out] == [200, 400] and out[1][2] and out[1][1]["connection"] == "close"
    assert [r.path for r in app.requests] == ["/a"] and transport.eof  # FIN sent, then a lingering close
    loop.advance(3)
    assert transport.closed


def test_http10_with_transfer_encoding_is_refused():
    conn, transport, _, _ = connect()
    conn.data_received(b"POST /x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert answers(transport.take())[0][0] == 400


def test_trailers_are_never_merged_into_the_headers():
    conn, transport, _, app = connect()
    conn.data_received(
        b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Evil: 1\r\n\r\n"
    )
    assert app.requests[0].body == b"abc" and b"x-evil" not in app.requests[0].headers


def test_expect_100_continue_is_sent_for_http11_only():
    conn, transport, _, _ = connect()
    conn.data_received(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
    assert transport.take() == b"HTTP/1.1 100 Continue\r\n\r\n"
    conn2, transport2, _, _ = connect()
    conn2.data_received(b"POST /x HTTP/1.0\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
    assert transport2.take() == b""


def test_a_client_that_goes_away_drops_the_request_it_left():
    conn, transport, _, app = connect(App(at_once=False))
    conn.data_received(get("/a"))
    conn.connection_lost(None)
    assert app.abandoned == 1
    app.replies[0](Response(200, b"late"))  # the app's late answer goes nowhere
    assert transport.take() == b""


# limits


@pytest.mark.parametrize(
    "data,status",
    [
        (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n", 431),
        (b"POST / HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n", 413),
    ],
    ids=["request line", "header bytes", "header lines", "declared body"],
)
def test_heads_and_bodies_over_the_limits_are_refused_before_they_are_read(data, status):
    conn, transport, _, app = connect()
    conn.data_received(data)
    assert answers(transport.take())[0][0] == status and not app.requests


def test_a_chunked_body_is_counted_as_it_arrives():
    conn, transport, _, app = connect(limits=Limits(max_body=1000))
    conn.data_received(b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(3):
        conn.data_received(b"190\r\n" + b"a" * 400 + b"\r\n")
    assert answers(transport.take())[0][0] == 413 and not app.requests


def test_connections_past_the_cap_get_503_and_are_closed():
    tally = Tally()
    held = [connect(tally=tally, limits=Limits(connections=2)) for _ in range(2)]
    _, transport, _, _ = connect(tally=tally, limits=Limits(connections=2))
    ((status, headers, _),) = answers(transport.take())
    assert status == 503 and headers["retry-after"] == "1" and transport.closed and tally.open == 2
    held[0][0].connection_lost(None)
    assert tally.open == 1


# flow control


def test_reading_stops_while_the_client_leaves_its_answers_unread_and_resumes_after():
    tally = Tally()
    conn, transport, _, app = connect(tally=tally)
    conn.pause_writing()  # the transport's buffer passed Limits.unsent_bytes
    conn.data_received(get("/a") + get("/b"))
    assert not app.requests and not transport.reading and tally.paused == 1  # read, not parsed, until answers go out
    conn.resume_writing()
    assert [r.path for r in app.requests] == ["/a", "/b"] and transport.reading and tally.paused == 0


def test_reading_stops_once_the_pipelining_bound_is_reached():
    """What one read brings is parsed (asyncio reads at most 256 KiB); the next read is kept unparsed, and the
    connection unread, while that many requests wait behind the one being answered."""
    conn, transport, _, app = connect(App(at_once=False), limits=Limits(pipelined=2))
    conn.data_received(get("/0") + get("/1") + get("/2"))
    assert transport.reading and len(conn.queue) == 2  # one with the app, two waiting
    conn.data_received(get("/3") + get("/4") + get("/5"))
    assert not transport.reading and len(conn.queue) == 2 and conn.stash is not None
    for i in range(6):
        app.replies[i](Response(200, b"%d" % i))
    assert transport.reading and [b for _, _, b in answers(transport.take())] == [b"%d" % i for i in range(6)]


# deadlines, on the mock clock


def test_a_slow_head_gets_408_at_its_deadline_and_not_before():
    conn, transport, loop, _ = connect(limits=Limits(header_timeout_s=5))
    conn.data_received(b"GET / HTTP/1.1\r\nHost:")
    loop.advance(4.9)
    assert transport.take() == b""
    loop.advance(0.2)
    assert answers(transport.take())[0][0] == 408


def test_a_body_is_timed_between_reads_not_over_the_whole_body():
    conn, transport, loop, app = connect(limits=Limits(body_timeout_s=2))
    conn.data_received(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
    for _ in range(9):  # 9 s of upload, one byte every 1.5 s
        loop.advance(1.5)
        conn.data_received(b"a")
    assert transport.take() == b"" and not app.requests
    loop.advance(2.5)  # then nothing for longer than the limit
    assert answers(transport.take())[0][0] == 408


def test_an_idle_keep_alive_connection_is_closed_after_its_timeout():
    conn, transport, loop, _ = connect(limits=Limits(idle_timeout_s=75))
    conn.data_received(get())
    transport.take()
    loop.advance(74)
    assert not transport.closed
    loop.advance(2)
    assert transport.closed and not transport.aborted


def test_idle_time_does_not_count_while_the_server_holds_the_request():
    conn, transport, loop, app = connect(App(at_once=False), limits=Limits(idle_timeout_s=5))
    conn.data_received(get())
    loop.advance(30)  # the model is slow: the client is not idle, we are
    assert not transport.closed
    app.replies[0](Response(200, b"ok"))
    loop.advance(6)
    assert transport.closed


def test_a_client_that_reads_none_of_its_answers_is_dropped_after_the_send_timeout():
    conn, transport, loop, _ = connect(limits=Limits(send_timeout_s=60))
    conn.pause_writing()
    loop.advance(59)
    assert not transport.aborted
    loop.advance(2)
    assert transport.aborted
