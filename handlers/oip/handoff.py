"""A gRPC connection's inference calls shared among the workers: HTTP/2 keeps every stream of a connection in the
process that accepted it (grpc#28867), and one tritonclient or perf_analyzer puts many calls on one connection. The
worker holding the connection reads each ModelInfer call and, when another worker runs fewer calls, hands the call's
message to it over a Unix socket and answers the client with what comes back (bench/NOTES.md, lever 67). A call
handed to a worker that dies is run by the worker holding the connection: no call is lost to it. A handed call its
client cancels (or whose deadline passes) is cancelled where it runs, as a call run here is."""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

from .grpc_calls import Aborted, Call, Method, Status, outcome
from .sockets import GONE, Shares

logger = logging.getLogger("torchship.oip")
# to the worker running it: what (RUN or CANCEL), the length after this, the call's number, and (RUN) the lengths of
# the client's address and of its traceparent, which come before the message
CALL = struct.Struct(">BIIHH")
RUN, CANCEL = 0, 1
ANSWER = struct.Struct(">IIB")  # its answer: the length after this, the call's number, its gRPC status
MARGIN = 4  # a call goes to a worker running at least this many fewer calls (2 handed too often: NOTES lever 69)
RETRY_S = 0.5  # how long a worker that could not be reached is left alone
RUNNING = "calls-running"  # each worker's calls in progress, in a file beside the supervisor's saved state


def socket_path(directory: Path, index: int) -> str:
    return str(directory / f"worker-{index}.sock")


class Handoff:
    """This worker's side: its count of calls running, published; links to the other workers for calls it hands
    over (`choose`); and a Unix socket on which it runs the calls they hand to it."""

    def __init__(self, directory: str | Path, workers: int, index: int, handed: Callable[[], None] = lambda: None):
        self.directory, self.workers, self.index, self.handed = Path(directory), workers, index, handed
        self.counts = Shares(self.directory / RUNNING, workers, index)
        self.running = 0  # calls this worker runs: its own clients' and those handed to it
        self.closed = False  # stopping: its count reads GONE, so that no worker hands it another call
        self.links: dict[int, Link] = {}
        self.retry_at = dict.fromkeys((i for i in range(workers) if i != index), 0.0)
        self.connecting: set[int] = set()
        self.method: Method | None = None  # the method whose calls travel (grpc_calls.Server sets it)
        self.server: asyncio.AbstractServer | None = None
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        path = socket_path(self.directory, self.index)
        try:
            os.unlink(path)  # the socket of the worker this one replaces
        except FileNotFoundError:
            pass
        try:
            self.server = await asyncio.get_running_loop().create_unix_server(lambda: Taker(self), path)
        except OSError as e:  # a path over the socket name's 108 bytes (a long TMPDIR): serve without taking calls
            logger.warning("no socket for calls from the other workers (%s): %s", path, e.strerror or e)
            self.close()

    def close(self) -> None:
        """No call is handed to this worker any more; those it holds are still answered."""
        self.closed = True
        self.counts.set(GONE)
        if self.server is not None:
            self.server.close()

    def started(self) -> None:
        self.running += 1
        if not self.closed:
            self.counts.set(self.running)

    def ended(self) -> None:
        self.running -= 1
        if not self.closed:
            self.counts.set(self.running)

    def choose(self) -> Link | None:
        """The linked worker running the fewest calls, if it runs at least MARGIN fewer than this one; None: run it
        here. A call on its way to a worker is counted as running there until that worker counts it itself."""
        counts = self.counts.all()
        best, least = None, self.running - MARGIN
        for i, retry_at in self.retry_at.items():
            link = self.links.get(i)
            if link is None:
                if i not in self.connecting and time.monotonic() >= retry_at:
                    self.connect(i)
                continue
            theirs = max(counts[i], len(link.pending))
            if theirs <= least:
                best, least = link, theirs
        return best

    def connect(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        self.connecting.add(index)

        async def link() -> None:
            try:
                _, self.links[index] = await loop.create_unix_connection(
                    lambda: Link(self, index), socket_path(self.directory, index)
                )
            except OSError:  # not started yet, or gone: try again later
                self.retry_at[index] = time.monotonic() + RETRY_S
            finally:
                self.connecting.discard(index)

        self.keep(loop.create_task(link()))

    def lost(self, link: Link) -> None:
        if self.links.get(link.index) is link:
            del self.links[link.index]
        self.retry_at[link.index] = time.monotonic() + RETRY_S

    def keep(self, task: asyncio.Task) -> None:
        self.tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self.tasks.discard)


class Link(asyncio.Protocol):
    """The handing side of one other worker's socket: calls out, answers back; the calls it had not answered when it
    went away are run here."""

    def __init__(self, handoff: Handoff, index: int):
        self.handoff, self.index = handoff, index
        self.transport: asyncio.Transport | None = None
        self.pending: dict[int, tuple[Call, bytes]] = {}
        self.number = 0
        self.buf = bytearray()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, call: Call, message: bytes) -> int:
        """CALL's message to the other worker; the call's number on this link, for `cancel`."""
        self.number = number = (self.number + 1) & 0xFFFFFFFF
        self.pending[number] = (call, message)
        peer, traceparent = call.conn.peer.encode(), (call.headers.get(b"traceparent") or b"")[:512]
        size = len(peer) + len(traceparent) + len(message)
        head = CALL.pack(RUN, size, number, len(peer), len(traceparent))
        self.transport.writelines((head, peer, traceparent, message))
        self.handoff.handed()
        return number

    def cancel(self, number: int) -> None:
        """The client no longer wants call NUMBER: the other worker stops it, and it is not run here if the link
        breaks."""
        if self.pending.pop(number, None) is not None and not self.transport.is_closing():
            self.transport.write(CALL.pack(CANCEL, 0, number, 0, 0))

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while len(buf) >= ANSWER.size:
            size, number, status = ANSWER.unpack_from(buf)
            end = ANSWER.size + size
            if len(buf) < end:
                break
            body = bytes(buf[ANSWER.size : end])
            del buf[:end]
            call = self.pending.pop(number, (None, b""))[0]
            if call is not None:  # else the client went away meanwhile: nothing to answer
                call.answer(status, body)

    def connection_lost(self, exc) -> None:
        self.handoff.lost(self)
        pending, self.pending = self.pending, {}
        if pending:
            logger.warning("worker %d went away holding %d handed calls: running them here", self.index, len(pending))
        for call, message in pending.values():
            if not call.done:
                call.start(message)


class Taker(asyncio.Protocol):
    """The serving side: calls another worker handed over, run as its own clients' are, answered on the socket."""

    def __init__(self, handoff: Handoff):
        self.handoff = handoff
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.calls: dict[int, asyncio.Task] = {}  # running, by their number on the link

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while len(buf) >= CALL.size:
            kind, size, number, peer_len, tp_len = CALL.unpack_from(buf)
            end = CALL.size + size
            if len(buf) < end:
                break
            if kind == CANCEL:
                del buf[:end]
                task = self.calls.pop(number, None)
                if task is not None:
                    task.cancel()
                continue
            at = CALL.size + peer_len + tp_len
            peer = buf[CALL.size : CALL.size + peer_len].decode("latin-1")
            traceparent = bytes(buf[CALL.size + peer_len : at]) or None
            if end == len(buf):  # the call ends the buffer: its message is the buffer, not a copy (NOTES lever 72)
                del buf[:at]
                message, self.buf = buf, bytearray()
                buf = self.buf
            else:
                message = bytes(buf[at:end])
                del buf[:end]
            task = asyncio.get_running_loop().create_task(self.run(number, peer, traceparent, message))
            self.calls[number] = task
            task.add_done_callback(lambda t, n=number: self.calls.pop(n, None) if self.calls.get(n) is t else None)
            self.handoff.keep(task)

    async def run(self, number: int, peer: str, traceparent: bytes | None, message: bytes) -> None:
        handoff, method = self.handoff, self.handoff.method
        handoff.started()
        try:
            status, why, body = await outcome(method.fn(method.parse(message), Context(peer, traceparent)), "handed")
        except asyncio.CancelledError:
            return  # its client cancelled it, and was answered by the worker holding its connection
        finally:
            handoff.ended()
        body = body if status == Status.OK else why.encode()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines((ANSWER.pack(len(body), number, status), body))

    def connection_lost(self, exc) -> None:
        """The worker holding these calls' connections is gone, and their clients with it: the calls stop."""
        self.transport = None
        calls, self.calls = self.calls, {}
        for task in calls.values():
            task.cancel()


class Context:
    """The servicer context of a handed call: the client's address and trace header, as the holding worker read
    them."""

    def __init__(self, peer: str, traceparent: bytes | None):
        self._peer, self.traceparent = peer, traceparent

    def peer(self) -> str:
        return self._peer

    def header(self, name: str) -> str | None:
        return self.traceparent.decode("latin-1") if name == "traceparent" and self.traceparent else None

    async def abort(self, status: Status, message: str):
        raise Aborted(status, message)
