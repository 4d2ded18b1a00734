"""Handing a gRPC connection's calls to another worker (oip/handoff.py): two workers' Handoffs in one process, on real
Unix sockets in the test's folder; the call is a recording stand-in for grpc_calls.Call (its `answer` and `start`).
The server's own two workers sharing one tritonclient connection are in tests/test_oip.py."""

from __future__ import annotations

import asyncio
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


def method(gate: asyncio.Event | None = None) -> Method:
    """A unary method that names its request, the client and the trace, refuses b"refuse", and (GATE) waits. (Its
    response is a well-known type: kserve's and tritonclient's protos cannot both be in one test process.)"""

    async def fn(request: bytes, context):
        if gate is not None:
            await gate.wait()
        if request == b"refuse":
            await context.abort(Status.NOT_FOUND, "no such model")
        return StringValue(value=f"{request.decode()}|{context.peer()} {context.header('traceparent')}")

    return Method(fn, lambda data: data, handed=True)


async def until(condition, what: str, seconds: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.005)


async def two_workers(tmp_path, gate: asyncio.Event | None = None) -> tuple[Handoff, Handoff, list]:
    handed: list = []
    a, b = Handoff(tmp_path, 2, 0, lambda: handed.append(1)), Handoff(tmp_path, 2, 1)
    a.method = b.method = method(gate)
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
        gate = asyncio.Event()
        a, b, _ = await two_workers(tmp_path, gate)
        link = a.links[1]
        calls = [Held() for _ in range(3)]
        for i, call in enumerate(calls):
            link.send(call, b"call %d" % i)
        await until(lambda: b.running == 3, "worker 1 running the three calls")
        assert a.counts.all()[1] == 3  # what worker 0 reads before it hands another
        link.transport.abort()  # the link breaks as when worker 1 is killed
        assert [await asyncio.wait_for(c.outcome, 10) for c in calls] == [("here", b"call %d" % i) for i in range(3)]
        assert 1 not in a.links and a.choose() is None  # left alone for RETRY_S
        gate.set()
        await until(lambda: b.running == 0, "worker 1's calls ended")
        a.close()
        b.close()

    asyncio.run(main())
