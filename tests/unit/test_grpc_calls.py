"""gRPC calls over the HTTP/2 core (oip/grpc_calls.py on oip/http2.py), driven without sockets on test_http2's mock
transport and a real event loop: a call's messages unframed as the client sent them, however the bytes arrive.
The server's gRPC service with real clients is in tests/test_triton_clients.py."""

from __future__ import annotations

import asyncio
import hashlib

import hpack
from google.protobuf.wrappers_pb2 import StringValue
from test_http2 import REQUEST, frames
from test_http11 import MockTransport

from torchship.handlers.oip import http2
from torchship.handlers.oip.config import Limits
from torchship.handlers.oip.flow_control import Tally
from torchship.handlers.oip.grpc_calls import PREFIX, Method, Server


def digest(data) -> str:
    return hashlib.sha256(data).hexdigest()


async def echo(request, context) -> StringValue:
    """The request's size and digest, and the type it came as."""
    return StringValue(value=f"{len(request)} {digest(request)} {type(request).__name__}")


def test_a_large_message_arrives_as_sent_and_the_next_call_reads_its_own():
    """A 600 KB message in one DATA frame, read in three pieces (the frame and then the message are handed over as the
    connection's buffer, not copied), then a small call on the same connection: each method sees its own bytes."""

    async def main() -> list[str]:
        server = Server("s", {"M": Method(echo, lambda data: data)}, Limits(), Tally())
        conn, transport = http2.Connection(server.open, Limits(), Tally()), MockTransport()
        conn.connection_made(transport)
        conn.data_received(http2.PREFACE)
        encoder = hpack.Encoder()
        large = bytes(range(251)) * 2400
        wire = http2.frame(http2.HEADERS, http2.END_HEADERS, 1, encoder.encode(REQUEST))
        wire += http2.frame(http2.DATA, http2.END_STREAM, 1, PREFIX.pack(0, len(large)) + large)
        for at in range(0, len(wire), 256_000):
            conn.data_received(wire[at : at + 256_000])
        conn.data_received(
            http2.frame(http2.HEADERS, http2.END_HEADERS, 3, encoder.encode(REQUEST))
            + http2.frame(http2.DATA, http2.END_STREAM, 3, PREFIX.pack(0, 5) + b"small")
        )
        answers: dict[int, str] = {}
        for _ in range(500):
            await asyncio.sleep(0.01)
            for kind, _, sid, payload in frames(transport.buffer):
                if kind == http2.DATA:
                    answers[sid] = StringValue.FromString(payload[5:]).value
            if len(answers) == 2:
                return [answers[1], answers[3]]
        raise AssertionError(f"answered {sorted(answers)} of streams 1 and 3")

    first, second = asyncio.run(main())
    assert first == f"{2400 * 251} {digest(bytes(range(251)) * 2400)} bytearray"  # handed over whole, as sent
    assert second.startswith(f"5 {digest(b'small')} ")
