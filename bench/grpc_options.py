"""Issue 36, item 4, measured before building: what one unary ModelInfer costs a server in each way Python can serve
gRPC, as the server process's CPU time (user + system) per call, so the load client's own cost does not count.

- aio: grpc.aio on uvloop, what the OIP server runs;
- sync: grpcio's synchronous server, C-core's completion queue and a pool of 16 threads;
- grpclib: pure Python on h2 (its maintainer, grpclib#81: at least 2x slower than grpcio);
- h2: a transport of our own, an asyncio Protocol over h2 on uvloop (unary calls only, no flow-control corner cases);
- ours: what the OIP server runs since lever 65, our HTTP/2 (oip/http2.py) and gRPC calls (oip/grpc_calls.py).

Every handler does the same: parse the ModelInferRequest (one PNG digit as BYTES), answer one fixed ModelInferResponse.
The client is grpcio's synchronous stub, 16 threads with a channel each, in this process. `h2` and `grpclib` are not
the project's dependencies: `pip install --target DIR h2 grpclib`, then
`PYTHONPATH=DIR .venv/bin/python -m bench.grpc_options [CALLS] [KIND ...]`."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time

SERVICE, METHOD = "inference.GRPCInferenceService", "ModelInfer"
KINDS = ("aio", "sync", "grpclib", "h2", "ours")
CONCURRENCY = 16


def messages():
    from torchship.handlers.protocol.v2_grpc import messages as kserve_messages

    return kserve_messages()


def response():
    pb = messages()
    out = pb.ModelInferResponse(model_name="mnist", model_version="1", id="")
    t = out.outputs.add(name="label", datatype="BYTES", shape=[1])
    t.contents.bytes_contents.append(b"7")
    return out


def request():
    from torchship.serve.samples import held_out_digits, png

    pb = messages()
    req = pb.ModelInferRequest(model_name="mnist")
    req.inputs.add(name="images", datatype="BYTES", shape=[1])
    req.raw_input_contents.append(png(held_out_digits()[0][0]))
    return req


def serve(kind: str, port: int) -> None:
    import grpc

    pb, answer = messages(), response()

    def parse(data: bytes):
        return pb.ModelInferRequest.FromString(data)

    if kind == "sync":
        from concurrent.futures import ThreadPoolExecutor

        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                METHOD: grpc.unary_unary_rpc_method_handler(
                    lambda r, c: answer, parse, pb.ModelInferResponse.SerializeToString
                )
            },
        )
        server = grpc.server(ThreadPoolExecutor(CONCURRENCY))
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        print("ready", flush=True)
        server.wait_for_termination()
        return
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    servers = {"aio": aio, "grpclib": grpclib_server, "h2": h2_server, "ours": ours}
    asyncio.run(servers[kind](port, pb, answer, parse))


async def aio(port, pb, answer, parse):
    import grpc

    async def infer(request, context):
        return answer

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {METHOD: grpc.unary_unary_rpc_method_handler(infer, parse, pb.ModelInferResponse.SerializeToString)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


async def grpclib_server(port, pb, answer, parse):
    from grpclib.const import Cardinality, Handler
    from grpclib.server import Server

    class Service:
        async def infer(self, stream):
            await stream.recv_message()
            await stream.send_message(answer)

        def __mapping__(self):
            return {
                f"/{SERVICE}/{METHOD}": Handler(
                    self.infer, Cardinality.UNARY_UNARY, pb.ModelInferRequest, pb.ModelInferResponse
                )
            }

    server = Server([Service()])
    await server.start("127.0.0.1", port)
    print("ready", flush=True)
    await server.wait_closed()


async def h2_server(port, pb, answer, parse):
    import h2.config
    import h2.connection
    import h2.events

    body = answer.SerializeToString()
    message = b"\x00" + len(body).to_bytes(4, "big") + body

    class Protocol(asyncio.Protocol):
        def connection_made(self, transport):
            config = h2.config.H2Configuration(client_side=False, header_encoding=None)
            self.conn, self.transport, self.bodies = h2.connection.H2Connection(config=config), transport, {}
            self.conn.initiate_connection()
            transport.write(self.conn.data_to_send())

        def data_received(self, data):
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    self.bodies[event.stream_id] = bytearray()
                elif isinstance(event, h2.events.DataReceived):
                    self.bodies[event.stream_id] += event.data
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    parse(bytes(self.bodies.pop(event.stream_id))[5:])
                    sid = event.stream_id
                    self.conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
                    self.conn.send_data(sid, message)
                    self.conn.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
            self.transport.write(self.conn.data_to_send())

    server = await asyncio.get_running_loop().create_server(Protocol, "127.0.0.1", port)
    print("ready", flush=True)
    await server.serve_forever()


async def ours(port, pb, answer, parse):
    from torchship.handlers.oip.config import Limits
    from torchship.handlers.oip.flow_control import Tally
    from torchship.handlers.oip.grpc_calls import Method, Server
    from torchship.handlers.oip.sockets import shared_listener

    async def infer(request, context):
        return answer

    server = Server(SERVICE, {METHOD: Method(infer, parse)}, Limits(), Tally())
    server.start(shared_listener("127.0.0.1", port, "gRPC"))
    print("ready", flush=True)
    await asyncio.Event().wait()


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(port: int, calls: int) -> float:
    """CALLS calls over CONCURRENCY threads, a channel each; the seconds they took."""
    import grpc

    pb, payload = messages(), request().SerializeToString()
    left, lock = [calls], threading.Lock()

    def client():
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(
                f"/{SERVICE}/{METHOD}", request_serializer=None, response_deserializer=pb.ModelInferResponse.FromString
            )
            while True:
                with lock:
                    if left[0] <= 0:
                        return
                    left[0] -= 1
                call(payload, timeout=30)

    threads = [threading.Thread(target=client) for _ in range(CONCURRENCY)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def measure(kind: str, calls: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.grpc_options", "serve", kind, str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        load(port, 400)  # warm: connections, the first calls
        before = cpu_seconds(proc.pid)
        seconds = load(port, calls)
        used = cpu_seconds(proc.pid) - before
        return {
            "kind": kind,
            "calls": calls,
            "server_cpu_us_per_call": used / calls * 1e6,
            "calls_per_s": calls / seconds,
        }
    finally:
        proc.terminate()
        proc.wait(10)


def main(argv: list[str]) -> None:
    if argv[:1] == ["serve"]:
        return serve(argv[1], int(argv[2]))
    calls = int(argv[0]) if argv else 6000
    kinds = argv[1:] or KINDS
    rounds = []
    for r in range(3):  # alternating rounds: the machine drifts
        for kind in kinds:
            m = measure(kind, calls)
            rounds.append({"round": r + 1, **m})
            print(json.dumps(rounds[-1]), flush=True)
    for kind in kinds:
        cpu = sorted(x["server_cpu_us_per_call"] for x in rounds if x["kind"] == kind)
        rate = sorted(x["calls_per_s"] for x in rounds if x["kind"] == kind)
        print(
            f"{kind:<8} server CPU {cpu[1]:6.0f} us/call [{cpu[0]:.0f}-{cpu[-1]:.0f}]  "
            f"{rate[1]:6.0f} calls/s [{rate[0]:.0f}-{rate[-1]:.0f}]"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
