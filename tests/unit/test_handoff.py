"""Handing a gRPC connection's calls to another worker (oip/handoff.py): two workers' Handoffs in one process, on real
Unix sockets in the test's folder; the call is a recording stand-in for grpc_calls.Call (its `answer` and `start`),
but for the last test, where a real gRPC server's connection hands it.
The server's own two workers sharing one tritonclient connection are in tests/test_oip.py."""

from __future__ import annotations

import asyncio
import struct
from types import SimpleNamespace

from google.protobuf.wrappers_pb2 import StringValue

from torchship.handlers.oip.grpc_calls import Method, Status
from torchship.handlers.oip.handoff import MARGIN, Handoff

PEER = "ipv4:127.0.0.1:50000"
TRACEPARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Held:
    """A call on the handing worker's connection: what it was answered, or that it was started here."""

    def __init__(self, traceparent: bytes | None = None):
        self.conn = SimpleNamespace(peer=PEER)
        self.headers = {b"traceparent": traceparent} if traceparent else {}
        self.done = False
        self.outcome = asyncio.get_running_loop().create_future()

    def answer(self, status: int, body: bytes) -> None:
        self.done = True
        self.outcome.set_result((status, body))

    def start(self, message: bytes) -> None:
        self.done = True
        self.outcome.set_result(("here", message))


def method(gate: asyncio.Event | None = None, cancelled: list | None = None) -> Method:
    """A unary method that names its request, the client and the trace, refuses b"refuse", and (GATE) waits, noting
    the requests cancelled while they waited in CANCELLED. (Its response is a well-known type: kserve's and
    tritonclient's protos cannot both be in one test process.)"""

    async def fn(request: bytes, context):
        if gate is not None:
            try:
                await gate.wait()
            except asyncio.CancelledError:
                if cancelled is not None:
                    cancelled.append(request)
                raise
        if request == b"refuse":
            await context.abort(Status.NOT_FOUND, "no such model")
        return StringValue(value=f"{request.decode()}|{context.peer()} {context.header('traceparent')}")

    return Method(fn, lambda data: data, handed=True)


async def until(condition, what: str, seconds: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.005)


async def two_workers(tmp_path, gate=None, cancelled=None) -> tuple[Handoff, Handoff, list]:
    handed: list = []
    a, b = Handoff(tmp_path, 2, 0, lambda: handed.append(1)), Handoff(tmp_path, 2, 1)
    a.method = b.method = method(gate, cancelled)
    await a.start()
    await b.start()
    assert a.choose() is None  # the first look starts the link
    await until(lambda: 1 in a.links, "worker 0 linked to worker 1")
    return a, b, handed


def test_a_call_goes_to_the_other_worker_only_when_this_one_runs_margin_more(tmp_path):
    async def main() -> None:
        a, b, _ = await two_workers(tmp_path)
        for _ in range(MARGIN):
            assert a.choose() is None, f"handed with {a.running} running here and none there"
            a.started()
        assert a.choose() is a.links[1]
        b.started()  # the other worker now runs one: MARGIN more here is not enough
        assert a.counts.all() == (MARGIN, 1) and a.choose() is None
        a.started()
        assert a.choose() is a.links[1]
        b.close()  # a stopping worker takes no more, even once the call it ran has ended
        assert a.choose() is None
        b.ended()
        assert a.choose() is None
        a.close()

    asyncio.run(main())


def test_a_handed_call_is_answered_with_what_the_other_worker_ran(tmp_path):
    async def main() -> None:
        a, b, handed = await two_workers(tmp_path)
        link = a.links[1]
        calls = [Held(TRACEPARENT), Held(), Held()]
        for call, message in zip(calls, (b"digits", b"refuse", b"x" * 300_000), strict=True):
            link.send(call, message)  # one large enough to arrive in pieces
        outcomes = [await asyncio.wait_for(c.outcome, 10) for c in calls]
        assert outcomes[0][0] == Status.OK
        assert StringValue.FromString(outcomes[0][1]).value == f"digits|{PEER} {TRACEPARENT.decode()}"
        assert outcomes[1] == (Status.NOT_FOUND, b"no such model")
        assert outcomes[2][0] == Status.OK
        assert StringValue.FromString(outcomes[2][1]).value == "x" * 300_000 + f"|{PEER} None"
        assert len(handed) == 3 and not link.pending and b.running == 0
        a.close()
        b.close()

    asyncio.run(main())


def test_the_calls_a_worker_held_when_it_went_away_run_here(tmp_path):
    async def main() -> None:
        gate, cancelled = asyncio.Event(), []
        a, b, _ = await two_workers(tmp_path, gate, cancelled)
        link = a.links[1]
        calls = [Held() for _ in range(3)]
        for i, call in enumerate(calls):
            link.send(call, b"call %d" % i)
        await until(lambda: b.running == 3, "worker 1 running the three calls")
        assert a.counts.all()[1] == 3  # what worker 0 reads before it hands another
        link.transport.abort()  # the link breaks as when worker 1 is killed
        assert [await asyncio.wait_for(c.outcome, 10) for c in calls] == [("here", b"call %d" % i) for i in range(3)]
        assert 1 not in a.links and a.choose() is None  # left alone for RETRY_S
        # and, were worker 0 the one gone, its clients went with it: worker 1 stops their calls, the gate still shut
        await until(lambda: b.running == 0, "worker 1's calls stopped")
        assert sorted(cancelled) == [b"call %d" % i for i in range(3)]
        a.close()
        b.close()

    asyncio.run(main())


def test_a_handed_call_its_client_cancels_stops_where_it_runs_and_is_not_answered(tmp_path):
    async def main() -> None:
        gate, cancelled = asyncio.Event(), []
        a, b, _ = await two_workers(tmp_path, gate, cancelled)
        link = a.links[1]
        gone, kept = Held(), Held()
        number = link.send(gone, b"gone")
        await until(lambda: b.running == 1, "worker 1 running the call")
        link.cancel(number)
        await until(lambda: b.running == 0, "the cancelled call stopped, the gate still shut")
        assert cancelled == [b"gone"] and not link.pending
        link.send(kept, b"kept")  # answered after anything worker 1 sent for the first: it sent nothing
        gate.set()
        assert (await asyncio.wait_for(kept.outcome, 10))[0] == Status.OK
        assert not gone.outcome.done()
        link.cancel(number)  # once more, or after its answer: nothing is sent, nothing breaks
        a.close()
        b.close()

    asyncio.run(main())


def test_a_client_resetting_a_handed_stream_cancels_the_call_in_the_worker_running_it(tmp_path):
    """The whole holding side: a real gRPC server's HTTP/2 connection (on test_http2's mock transport) hands its call
    to the other worker; the client's RST_STREAM reaches that worker as a cancel."""
    import hpack
    from test_http2 import REQUEST, Loop
    from test_http11 import MockTransport

    from torchship.handlers.oip import http2
    from torchship.handlers.oip.config import Limits
    from torchship.handlers.oip.flow_control import Tally
    from torchship.handlers.oip.grpc_calls import PREFIX, Server

    async def main() -> None:
        gate, cancelled = asyncio.Event(), []
        a, b, _ = await two_workers(tmp_path, gate, cancelled)
        server = Server("s", {"M": a.method}, Limits(), Tally(), a)
        conn, transport = http2.Connection(server.open, Limits(), Tally(), loop=Loop()), MockTransport()
        conn.connection_made(transport)
        conn.data_received(http2.PREFACE)
        for _ in range(MARGIN):  # this worker is busy enough to hand the next call
            a.started()
        conn.data_received(http2.frame(http2.HEADERS, http2.END_HEADERS, 1, hpack.Encoder().encode(REQUEST)))
        conn.data_received(http2.frame(http2.DATA, http2.END_STREAM, 1, PREFIX.pack(0, 5) + b"reset"))
        await until(lambda: b.running == 1, "the call handed to worker 1 and running there")
        assert a.links[1].pending
        conn.data_received(http2.frame(http2.RST_STREAM, 0, 1, struct.pack(">L", http2.CANCEL)))
        await until(lambda: b.running == 0, "worker 1 stopped the call")
        assert cancelled == [b"reset"] and not a.links[1].pending and server.active == 0
        a.close()
        b.close()

    asyncio.run(main())
