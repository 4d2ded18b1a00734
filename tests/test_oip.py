"""The Open Inference Protocol server, driven by tritonclient over REST and gRPC (a client no one here wrote), by raw
sockets for what no client would send, and by the load test: batching, workers, metrics, overload, hostile input."""

import base64
import http.client
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from torchship.handlers.model.onnx_model import load as load_onnx
from torchship.handlers.model.responses import probabilities
from torchship.handlers.oip.batching import Batcher
from torchship.handlers.oip.served import INLINE_PASS_MS
from torchship.serve import oip
from torchship.serve.loadtest import Payload, kill_worker_under_load, payloads, run_level
from torchship.serve.process import ServerError, free_ports
from torchship.serve.samples import held_out_digits, png

from helpers import TORCHSHIP, scrape, wait_for
from hostile import HOSTILE

DIGITS, LABELS = held_out_digits()
FOUR = [0, 100, 200, 300]  # four classes: the held-out set is ordered by label
CLIENTS = {"http": thttp, "grpc": tgrpc}


@pytest.fixture(scope="module")
def server(tmp_path_factory, convnet_export):
    """make serve RUNTIME=oip's defaults: two workers, batching sized from the measured model."""
    state = tmp_path_factory.mktemp("oip-state")
    cfg = oip.OIPConfig.on_free_ports(str(convnet_export.directory), "mnist", str(state))
    try:
        yield oip.start(cfg, timeout=120)
    finally:
        p = oip.pid(state)
        children = psutil.Process(p).children(recursive=True) if p else []
        oip.stop(state)
        assert oip.pid(state) is None and not any(c.is_running() for c in children)


def client(cfg, kind):
    return CLIENTS[kind].InferenceServerClient(f"127.0.0.1:{cfg.http_port if kind == 'http' else cfg.grpc_port}")


def images_input(kind, blobs):
    inp = CLIENTS[kind].InferInput("images", [len(blobs)], "BYTES")
    inp.set_data_from_numpy(np.array(blobs, dtype=object))  # tritonclient's default: binary tensor data
    return inp


def text(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def metric(cfg, name: str, **labels) -> float:
    return scrape(cfg.http_port, name, **labels)


def http_get(cfg, path: str):
    conn = http.client.HTTPConnection("127.0.0.1", cfg.http_port, timeout=30)
    conn.request("GET", path)
    r = conn.getresponse()
    out = r.status, r.read()
    conn.close()
    return out


def post(cfg, path: str, body: bytes, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", cfg.http_port, timeout=30)
    conn.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    out = r.status, r.read(), dict(r.getheaders())
    conn.close()
    return out


@pytest.mark.parametrize("kind", list(CLIENTS))
def test_health_readiness_and_metadata(server, kind):
    c = client(server, kind)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("mnist")
    assert not c.is_model_ready("no-such-model")  # not ready, as in Triton, over both (gRPC used to say NOT_FOUND)
    meta = c.get_model_metadata("mnist")
    if kind == "grpc":
        meta = {
            "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in meta.inputs],
            "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in meta.outputs],
        }
    assert meta["inputs"] == [
        {"name": "images", "datatype": "BYTES", "shape": [-1, 1]},
        {"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]},
    ]
    assert meta["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "label", "datatype": "BYTES", "shape": [-1]},
    ]


@pytest.mark.parametrize("kind", list(CLIENTS))
def test_digits_as_bytes_and_as_fp32_give_the_embeddings_answers(server, convnet_export, kind):
    model = load_onnx(convnet_export.onnx)
    blobs = [png(DIGITS[i]) for i in FOUR]
    result = client(server, kind).infer("mnist", [images_input(kind, blobs)])
    assert text(result.as_numpy("label")) == [r["label"] for r in model.predict(blobs)]
    x = np.stack([model.prepare(DIGITS[i]) for i in FOUR])
    inp = CLIENTS[kind].InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    probs = client(server, kind).infer("mnist", [inp]).as_numpy("probabilities")
    assert np.abs(probs - probabilities(model.card, model.run(x))).max() <= 1e-6


def test_plain_json_and_the_label_output_alone(server, convnet_export):
    blobs = [png(DIGITS[i]) for i in FOUR[:2]]
    body = {
        "id": "r7",
        "inputs": [
            {"name": "images", "datatype": "BYTES", "shape": [2], "data": [base64.b64encode(b).decode() for b in blobs]}
        ],
        "outputs": [{"name": "label"}],
    }
    status, reply, _ = post(server, "/v2/models/mnist/infer", json.dumps(body).encode())
    out = json.loads(reply)
    assert status == 200 and out["id"] == "r7" and [o["name"] for o in out["outputs"]] == ["label"]
    assert out["outputs"][0]["data"] == [r["label"] for r in load_onnx(convnet_export.onnx).predict(blobs)]


@pytest.mark.parametrize("kind", list(CLIENTS))
def test_the_classification_extension_answers_each_rows_top_classes_with_their_labels(server, convnet_export, kind):
    """Triton's classification extension (what its image examples ask for): `probabilities` with class_count=3 is
    BYTES [N, 3] of "value:index:label", highest first, the embedding's own top three."""
    blobs = [png(DIGITS[i]) for i in FOUR[:2]]
    asked = [CLIENTS[kind].InferRequestedOutput("probabilities", class_count=3)]
    result = client(server, kind).infer("mnist", [images_input(kind, blobs)], outputs=asked)
    got = result.as_numpy("probabilities")
    assert got.shape == (2, 3) and result.as_numpy("label") is None  # only what was asked for
    want = load_onnx(convnet_export.onnx).predict(blobs, topk=3)
    for row, answer in zip(got, want):
        parts = [x.decode().split(":") for x in row]
        assert [label for _, _, label in parts] == [t["label"] for t in answer["topk"]]
        assert [int(i) for _, i, _ in parts] == [int(t["label"]) for t in answer["topk"]]  # digits: index = label
        values = [float(v) for v, _, _ in parts]
        assert values == sorted(values, reverse=True) and abs(values[0] - answer["probability"]) < 1e-4
    with pytest.raises(InferenceServerException, match="outside 1..10"):
        client(server, kind).infer(
            "mnist",
            [images_input(kind, blobs)],
            outputs=[CLIENTS[kind].InferRequestedOutput("probabilities", class_count=11)],
        )


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_each_requests_size_is_counted_once_whichever_transport_carried_it(server, kind):
    """The request-size histogram is one line of the shared request path (handlers/oip/pipeline.py): a REST body and a
    gRPC message are each counted once, at their exact size, under their own protocol and nowhere else."""
    protocol = "rest" if kind == "http" else "grpc"
    digits = [png(DIGITS[i]) for i in (0, 1, 2)]
    if kind == "http":
        body, headers = bytes_input(3, digits)
        send, size = (lambda: post(server, "/v2/models/mnist/infer", body, headers)[0] == 200), len(body)
    else:
        import grpc
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        request = service_pb2.ModelInferRequest(model_name="mnist", id="sized")
        request.inputs.add(name="images", datatype="BYTES", shape=[3])
        request.raw_input_contents.append(b"".join(struct.pack("<I", len(d)) + d for d in digits))
        channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        send, size = (lambda: len(stub.ModelInfer(request).outputs) == 2), request.ByteSize()
    before = {
        p: (
            metric(server, "torchship_request_bytes_sum", protocol=p),
            metric(server, "torchship_request_bytes_count", protocol=p),
        )
        for p in ("rest", "grpc")
    }
    assert send() and send()
    after = {
        p: (
            metric(server, "torchship_request_bytes_sum", protocol=p),
            metric(server, "torchship_request_bytes_count", protocol=p),
        )
        for p in ("rest", "grpc")
    }
    other = "grpc" if protocol == "rest" else "rest"
    assert size > 500 and after[protocol][0] - before[protocol][0] == 2 * size
    assert after[protocol][1] - before[protocol][1] == 2 and after[other] == before[other]


@pytest.mark.parametrize("kind", list(CLIENTS))
def test_sixteen_concurrent_clients_are_each_answered_as_alone(server, kind):
    """tritonclient from 16 threads at once: every digit gets the label it gets alone, all counted as answered. (That
    requests arriving during a pass share the next is shown without a race: test_http_limits.py, gated worker.)"""
    before = metric(server, "torchship_requests_total", protocol="grpc" if kind == "grpc" else "rest", status=200)
    blobs = [png(DIGITS[i]) for i in range(0, 1000, 10)]

    def hammer(k):
        c = client(server, kind)
        try:
            return [text(c.infer("mnist", [images_input(kind, [b])]).as_numpy("label"))[0] for b in blobs[k::16]]
        finally:  # in its own thread: tritonclient's HTTP client closed by the garbage collector elsewhere warns
            c.close()

    alone = client(server, kind)
    want = [text(alone.infer("mnist", [images_input(kind, [b])]).as_numpy("label"))[0] for b in blobs]
    alone.close()
    with ThreadPoolExecutor(16) as pool:
        answered = list(pool.map(hammer, range(16)))
    assert [a for k in range(16) for a in answered[k]] == [w for k in range(16) for w in want[k::16]]
    after = metric(server, "torchship_requests_total", protocol="grpc" if kind == "grpc" else "rest", status=200)
    assert after - before == 2 * len(blobs)


def test_readiness_waits_for_the_warm_up_at_the_largest_batch(server, tmp_path, convnet_export):
    """A model that answers one image but not a full batch is never ready; the same model with batches of one is."""
    import onnx
    from onnx import TensorProto, helper

    card = json.loads((convnet_export.directory / "meta.json").read_text())
    card.update(output_kind="logits", output_name="logits")
    weights = helper.make_tensor("w", TensorProto.FLOAT, [784, 10], np.random.default_rng(0).normal(size=7840))
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["images"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "fixed",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.metadata_props.add(key="torchship", value=json.dumps(card))
    export = tmp_path / "fixed"
    export.mkdir()
    onnx.save(model, export / "model.onnx")
    (export / "meta.json").write_text(json.dumps(card))
    with pytest.raises(ServerError, match="warm-up"):
        oip.start(
            oip.OIPConfig.on_free_ports(
                str(export), "fixed", str(tmp_path / "a"), max_batch=8, threads=1, max_batch_delay_ms=0
            ),
            timeout=60,
        )
    assert oip.pid(tmp_path / "a") is None
    ones = oip.OIPConfig.on_free_ports(
        str(export), "fixed", str(tmp_path / "b"), max_batch=1, threads=1, max_batch_delay_ms=0
    )
    ones = oip.start(ones, timeout=60)
    try:
        log = (tmp_path / "b" / "logs" / oip.LOG).read_text()
        assert "warm-up: batch 1" in log and oip.status(tmp_path / "b")["ready"]
    finally:
        oip.stop(ones.state_dir)


def test_each_worker_runs_its_passes_where_its_warm_up_pass_decided(server):
    """Short passes on the event loop, long ones on the pass's thread: the choice follows the measured pass."""
    warm = [w["warmup"] for w in oip.status(server.state_dir)["workers"]]  # as `serve status` shows them
    assert len(warm) == 2
    for w in warm:
        assert w["batch"] == 8 and w["inline"] == (w["ms"] <= INLINE_PASS_MS)


@pytest.mark.parametrize(
    "inline,requests,prompt", [(True, 5, False), (False, 5, False), (True, 1, False), (True, 1, True), (False, 1, True)]
)
def test_a_pass_runs_on_the_loop_or_on_its_thread_with_the_same_answers(inline, requests, prompt):
    """Several requests' pass runs where it is told; a lone request's on the thread unless its protocol queues its
    company in the same turn of the loop (prompt), so that the loop can take in that company meanwhile."""
    import asyncio
    import threading

    ran_on = []

    def run(x):
        ran_on.append(threading.get_ident())
        return x * 2

    async def go():
        batcher = Batcher(run, max_batch=8, max_batch_delay_ms=0, max_queue=8)
        batcher.inline = inline
        rows = [np.full((1, 3), i, np.float32) for i in range(requests)]
        futures = [batcher.enqueue(r, prompt=prompt) for r in rows]
        batcher.start()
        answers = await asyncio.gather(*futures)
        await batcher.stop()
        return rows, answers, threading.get_ident()

    rows, answers, loop_thread = asyncio.run(go())
    for r, a in zip(rows, answers):
        np.testing.assert_array_equal(a, r * 2)
    assert len(ran_on) == 1  # one pass, all the rows
    assert (ran_on[0] == loop_thread) == (inline and (requests > 1 or prompt))


def expected(convnet_export, n=1000) -> list[Payload]:
    """Held-out digits, each labelled with what the embedding answers: a served answer must equal it."""
    bodies = payloads(n=n)
    labels = [r["label"] for r in load_onnx(convnet_export.onnx).predict([p.body for p in bodies])]
    return [Payload(p.body, label) for p, label in zip(bodies, labels)]


def test_soak_256_rest_clients_every_answer_the_embeddings(server, convnet_export):
    target = oip.load_target(server.state_dir)
    level = run_level(target, expected(convnet_export), 256, 300, 4000)
    assert level.requests == 4000 and level.errors == {} and level.accuracy == 1.0
    assert level.server["requests"] >= 4000  # the server counted them in its own metrics


def test_soak_64_grpc_clients_every_answer_the_embeddings(server, convnet_export):
    bodies = expected(convnet_export, 640)

    def one_client(k):
        c = tgrpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        out = []
        for p in bodies[k::64]:
            try:
                out.append(text(c.infer("mnist", [images_input("grpc", [p.body])]).as_numpy("label"))[0] == p.label)
            except InferenceServerException as e:
                out.append(str(e.status()))
        return out

    with ThreadPoolExecutor(64) as pool:
        results = [r for rs in pool.map(one_client, range(64)) for r in rs]
    assert len(results) == 640 and all(r is True for r in results), [r for r in results if r is not True][:3]


def v2_json(*inputs) -> bytes:
    return json.dumps({"inputs": list(inputs)}).encode()


def binary(header: dict, blob: bytes) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    return head + blob, {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


def bytes_input(n_claimed: int, elements: list[bytes]) -> tuple[bytes, dict]:
    blob = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    return binary(
        {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "BYTES",
                    "shape": [n_claimed],
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        },
        blob,
    )


def fp32_input(shape, values: np.ndarray) -> tuple[bytes, dict]:
    blob = values.astype("<f4").tobytes()
    return binary(
        {
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": shape, "parameters": {"binary_data_size": len(blob)}}
            ]
        },
        blob,
    )


DIGIT = png(DIGITS[0])
NESTED = b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}"
HOSTILE_V2 = [  # (name, body, headers, status, words)
    ("shape claims more elements", *bytes_input(3, [DIGIT, DIGIT]), 400, "2 elements for shape [3]"),
    ("shape claims fewer elements", *bytes_input(1, [DIGIT, DIGIT]), 400, "2 elements for shape [1]"),
    ("fp32 of the wrong shape", *fp32_input([1, 28, 28], np.zeros(784)), 400, "shape [N, 1, 28, 28]"),
    ("fp32 holding NaN", *fp32_input([1, 1, 28, 28], np.full(784, np.nan)), 400, "NaN or infinite"),
    ("fp32 holding Infinity", *fp32_input([1, 1, 28, 28], np.full(784, np.inf)), 400, "NaN or infinite"),
    (
        "NaN in JSON",
        v2_json({"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [float("nan")] * 784}),
        {},
        400,
        "NaN and Infinity are not JSON numbers",
    ),
    (
        "binary size runs past the body",
        binary(
            {
                "inputs": [
                    {"name": "images", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 500}}
                ]
            },
            b"\x05\x00\x00\x00ab",
        )[0],
        binary({}, b"")[1]
        | {
            "Inference-Header-Content-Length": str(
                len(
                    json.dumps(
                        {
                            "inputs": [
                                {
                                    "name": "images",
                                    "datatype": "BYTES",
                                    "shape": [1],
                                    "parameters": {"binary_data_size": 500},
                                }
                            ]
                        }
                    )
                )
            )
        },
        400,
        "runs past the end of the body",
    ),
    ("an element's length runs past its data", *bytes_input(1, [b""])[:1], bytes_input(1, [b""])[1], 400, ""),
    ("JSON nested 5000 deep", NESTED, {}, 400, "not valid JSON"),
    ("header length past the body", b'{"inputs": []}', {"Inference-Header-Content-Length": "999"}, 400, "does not fit"),
    (
        "wrong input name",
        v2_json({"name": "pixels", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.0] * 784}),
        {},
        400,
        "'images'",
    ),
    (
        "two inputs",
        v2_json(
            {"name": "images", "datatype": "BYTES", "shape": [1], "data": ["aGk="]},
            {"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.0] * 784},
        ),
        {},
        400,
        "one input",
    ),
    ("no inputs", b'{"id": "x"}', {}, 400, "inputs"),
    (
        "unknown output",
        json.dumps(
            {
                "inputs": [
                    {"name": "images", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(DIGIT).decode()]}
                ],
                "outputs": [{"name": "secret"}],
            }
        ).encode(),
        {},
        400,
        "unknown output",
    ),
]
# The TorchServe path's hostile images, each as the one element of a v2 BYTES tensor: the same status and reason.
HOSTILE_IMAGES = [h for h in HOSTILE if h[2].startswith(("image/", "application/postscript")) and not h[3]]


@pytest.mark.parametrize("name,body,headers,status,words", HOSTILE_V2, ids=[h[0] for h in HOSTILE_V2])
def test_hostile_v2_bodies_get_a_4xx_with_a_message_and_the_next_request_is_answered(
    server, name, body, headers, status, words
):
    got, reply, _ = post(server, "/v2/models/mnist/infer", body, headers)
    assert got == status and words in json.loads(reply)["error"], (got, reply[:300])
    ok, _, _ = post(server, "/v2/models/mnist/infer", *bytes_input(1, [DIGIT]))
    assert ok == 200


@pytest.mark.parametrize("case", HOSTILE_IMAGES, ids=[h[0] for h in HOSTILE_IMAGES])
def test_every_hostile_image_of_the_torchserve_path_is_refused_here_too(server, case):
    name, image, _, _, status, words = case
    got, reply, _ = post(server, "/v2/models/mnist/infer", *bytes_input(1, [image]))
    error = json.loads(reply)["error"]
    assert got == status and words in error and "element 0" in error, (got, error)


def test_a_body_far_over_the_limit_is_refused_before_it_is_read(server):
    """The client announces 100 MB and sends 1 KB: the answer comes at once, and the connection closes."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
        sock.sendall(
            b"POST /v2/models/mnist/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n" + b"x" * 1024
        )
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413") and b"limit" in reply
    chunked = b"POST /v2/models/mnist/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
        sock.sendall(chunked)
        try:
            for _ in range(12):  # 12 MB in 1 MB chunks: refused once past the 10 MB limit
                sock.sendall(b"100000\r\n" + b"x" * 0x100000 + b"\r\n")
        except OSError:
            pass  # the server closed the connection mid-upload, as it should
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 413")
    assert post(server, "/v2/models/mnist/infer", *bytes_input(1, [DIGIT]))[0] == 200


def test_a_grpc_message_over_the_limit_is_resource_exhausted(server):
    c = client(server, "grpc")
    with pytest.raises(InferenceServerException) as e:
        c.infer("mnist", [images_input("grpc", [b"\0" * (11 * 1024 * 1024)])])
    assert "RESOURCE_EXHAUSTED" in str(e.value.status())
    with pytest.raises(InferenceServerException) as e:
        c.infer("mnist", [images_input("grpc", [b"not an image"])])
    assert "INVALID_ARGUMENT" in str(e.value.status()) and "element 0" in str(e.value)
    assert text(c.infer("mnist", [images_input("grpc", [DIGIT])]).as_numpy("label")) == ["0"]


def test_a_burst_of_keep_alive_clients_is_spread_over_the_workers(server):
    """16 connections opened at once on the one listening socket the workers share: each worker holds some (before
    the counts were shared, the first worker awake took all 16 in most tries)."""
    pids = [w["pid"] for w in oip.status(server.state_dir)["workers"]]
    assert len(pids) == 2
    clients = [socket.create_connection(("127.0.0.1", server.http_port), timeout=30) for _ in range(16)]
    try:
        for c in clients:  # each one answered, so each is accepted by some worker
            c.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        for c in clients:
            assert c.recv(4096).startswith(b"HTTP/1.1 200")
        held = [
            sum(
                1
                for k in psutil.Process(pid).connections(kind="tcp")
                if k.laddr.port == server.http_port and k.status == psutil.CONN_ESTABLISHED
            )
            for pid in pids
        ]
        assert sum(held) == 16 and min(held) >= 4, held
    finally:
        for c in clients:
            c.close()


@pytest.mark.parametrize("fresh", [True, False], ids=["a-connection-per-request", "keep-alive"])
def test_kill_9_of_a_worker_under_load_costs_at_most_its_own_requests(server, convnet_export, fresh):
    """Five kills, each mid-load: no request sent after the kill fails, on a new connection (queued on the listening
    socket every worker shares) or on a kept one (the client's one reconnect lands there too); only what the dead
    worker held in flight may."""
    bodies = expected(convnet_export, n=200)
    for _ in range(5 if fresh else 1):
        before = oip.status(server.state_dir)
        victim = before["workers"][0]["pid"]
        target = oip.load_target(server.state_dir)
        level, d = kill_worker_under_load(target, victim, bodies, 16, 2000, fresh=fresh)
        assert d.requests == 2000 and d.sent_after_kill > 500 and d.in_flight_at_kill > 0  # killed mid-load
        assert d.failed_sent_after_kill == 0, d
        assert sum(d.failed.values()) == d.failed_in_flight <= d.in_flight_at_kill <= 16
        after = wait_for(  # the supervisor notices a death within its 0.2 s poll; its status lists the dead until then
            lambda n=len(before["workers"]), victim=victim: (
                (s := oip.status(server.state_dir))
                and victim not in [w["pid"] for w in s["workers"]]
                and len(s["workers"]) == n
                and all(w["ready"] for w in s["workers"])
                and s
            ),
            60,
            "the worker's replacement",
        )
        assert victim not in [w["pid"] for w in after["workers"]] and after["restarts"] == before["restarts"] + 1


OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # else grpcio's channels to one address share a connection


def grpc_calls_across_a_kill(url: str, victim: int, total: int, kill_at: int) -> tuple[list, float]:
    """TOTAL calls from 8 clients, each on a channel of its own; VICTIM killed once KILL_AT are answered: (start, end,
    answered right, or the error) a call, and when the kill was."""
    events, started, lock, killed = [], [0], threading.Lock(), [math.inf]

    def client():
        while True:
            with lock:
                if started[0] >= total:
                    return
                started[0] += 1
            start, ok = time.perf_counter(), False
            try:
                c = tgrpc.InferenceServerClient(url, channel_args=OWN_CONNECTION)
                ok = text(c.infer("mnist", [images_input("grpc", [DIGIT])]).as_numpy("label")) == ["0"]
                c.close()
            except InferenceServerException as e:
                ok = str(e)[:200]
            with lock:
                events.append((start, time.perf_counter(), ok))
                if len(events) == kill_at:  # killed as the KILL_AT-th answer comes, however fast the calls are
                    os.kill(victim, signal.SIGKILL)
                    killed[0] = time.perf_counter()  # after the signal: a call that starts later was sent after it

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return events, killed[0]


def test_kill_9_of_a_worker_fails_no_grpc_call_sent_after_it(server):
    """Issue 36 over gRPC, five kills: each call on a new connection; the gRPC port is one listening socket every
    worker shares (lever 65), so a call sent after the kill never meets the dead worker. Only calls in flight at the
    kill may fail."""
    for _ in range(5):
        before = oip.status(server.state_dir)
        victim = before["workers"][0]["pid"]
        events, killed = grpc_calls_across_a_kill(f"127.0.0.1:{server.grpc_port}", victim, 300, 90)
        after = [ok for start, _, ok in events if start >= killed]
        in_flight = [ok for start, end, ok in events if start < killed <= end]
        assert len(events) == 300 and len(after) > 100 and in_flight  # killed mid-load
        failed = [ok for ok in after if ok is not True]
        assert not failed, f"{len(failed)} of {len(after)} calls sent after the kill failed: {failed[:3]}"
        # the supervisor notices a death within its 0.2 s poll: until then its status still lists the dead worker
        wait_for(
            lambda n=len(before["workers"]), victim=victim: (
                (s := oip.status(server.state_dir))
                and victim not in [w["pid"] for w in s["workers"]]
                and len(s["workers"]) == n
                and all(w["ready"] for w in s["workers"])
            ),
            60,
            "the worker's replacement",
        )


def holders(server) -> list[int]:
    """The workers holding an established gRPC connection."""
    pids = [w["pid"] for w in oip.status(server.state_dir)["workers"]]
    port = server.grpc_port
    return [
        pid
        for pid in pids
        if any(k.status == "ESTABLISHED" and k.laddr.port == port for k in psutil.Process(pid).connections())
    ]


def calls_on_one_connection(c, total: int, in_flight: int, at: int = -1, then=lambda: None) -> list:
    """TOTAL ModelInfer calls of DIGIT on client C's one connection, IN_FLIGHT at a time: each call's label or error;
    THEN() once AT calls are answered."""
    inp = images_input("grpc", [DIGIT])
    room, answered, lock, done = threading.Semaphore(in_flight), [], threading.Lock(), threading.Event()

    def answer(result, error) -> None:
        with lock:
            answered.append(str(error)[:200] if error else text(result.as_numpy("label"))[0])
            if len(answered) == at:
                done.set()
        room.release()

    for i in range(total):
        room.acquire()
        if at >= 0 and i == at + in_flight:  # AT answered by now: the rest are sent after THEN
            done.wait(60)
            then()
        c.async_infer("mnist", [inp], answer, client_timeout=30)
    for _ in range(in_flight):
        room.acquire()
    return answered


def test_one_grpc_connections_calls_are_run_by_every_worker(server):
    """Issue 36: HTTP/2 keeps a connection's streams in the worker that accepted it (one tritonclient, or
    perf_analyzer's clients sharing a channel); that worker hands a ModelInfer call to another running fewer
    (oip/handoff.py). One client, one connection, 16 calls in flight: some are run by the other worker."""
    c = tgrpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    assert c.is_server_live()
    wait_for(lambda: len(holders(server)) == 1, 30, "the earlier tests' connections closed")  # this one, one worker
    before, labels = metric(server, "torchship_grpc_handed_calls_total"), []
    # a worker links to a replaced one (the kill tests before) only after handoff.RETRY_S: calls until it hands some
    wait_for(
        lambda: (
            labels.extend(calls_on_one_connection(c, 100, 16))
            or metric(server, "torchship_grpc_handed_calls_total") > before
        ),
        30,
        "a call handed to the other worker",
        every=0,
    )
    c.close()
    assert labels and labels == ["0"] * len(labels)


def test_a_killed_worker_loses_none_of_the_calls_handed_to_it(server):
    """Issue 36: a worker killed while it runs calls handed to it by the worker holding their connection: those calls
    are run by the holding worker, and none fails. Five kills of the worker not holding one client's connection."""
    for _ in range(5):
        c = tgrpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        assert c.is_server_live()
        (holding,) = holders(server)
        (other,) = [w["pid"] for w in oip.status(server.state_dir)["workers"] if w["pid"] != holding]
        # a worker that lost its link to the killed one reconnects to the replacement only after handoff.RETRY_S:
        # calls until it hands some again, so that the kill below lands while calls are handed
        start = metric(server, "torchship_grpc_handed_calls_total")
        wait_for(
            lambda c=c, start=start: (
                calls_on_one_connection(c, 64, 16) and metric(server, "torchship_grpc_handed_calls_total") > start
            ),
            30,
            "calls handed to the other worker",
            every=0,
        )
        handed = metric(server, "torchship_grpc_handed_calls_total")
        seen = []

        def kill(other=other, handed=handed, seen=seen) -> None:
            seen.append(metric(server, "torchship_grpc_handed_calls_total") - handed)
            os.kill(other, signal.SIGKILL)

        labels = calls_on_one_connection(c, 900, 16, at=300, then=kill)
        c.close()
        assert seen and seen[0] > 0  # calls were being handed to the worker when it was killed
        assert not psutil.pid_exists(other) or psutil.Process(other).status() == psutil.STATUS_ZOMBIE
        failed = [x for x in labels if x != "0"]
        assert len(labels) == 900 and not failed, f"{len(failed)} calls failed: {failed[:3]}"
        wait_for(
            lambda other=other: (
                (s := oip.status(server.state_dir))
                and other not in [w["pid"] for w in s["workers"]]
                and [w["ready"] for w in s["workers"]] == [True, True]
            ),
            60,
            "the worker's replacement",
        )


def test_a_public_bind_without_auth_in_front_is_refused(convnet_export, tmp_path):
    cfg = oip.OIPConfig.on_free_ports(str(convnet_export.directory), "mnist", str(tmp_path), host="0.0.0.0")
    with pytest.raises(ServerError, match="no authentication"):
        oip.start(cfg, timeout=30)
    assert oip.pid(tmp_path) is None


def test_the_cli_lifecycle_status_and_load_test(convnet_export, tmp_path):
    state = tmp_path / "state"
    http_port, grpc_port = free_ports(2)

    def cli(*args):
        return subprocess.run([*TORCHSHIP, *map(str, args)], capture_output=True, text=True, cwd=tmp_path, timeout=180)

    start = ["serve", "start", "--model", "digits", "--export-dir", convnet_export.directory, "--state-dir", state]
    r = cli(
        *start,
        "--runtime",
        "kserve",
        "--inference-port",
        http_port,
        "--grpc-port",
        grpc_port,
        "--max-batch",
        4,
        "--max-batch-delay-ms",
        3,
    )
    try:
        assert r.returncode == 0 and f"127.0.0.1:{http_port}" in r.stdout, r.stderr[-2000:]
        status = json.loads(cli("serve", "status", "--state-dir", state).stdout)
        assert status["running"] and status["ready"] and status["runtime"] == "oip" and len(status["workers"]) == 2
        # one Config from the command line to every worker's batcher, under one name for each setting
        settings = status["settings"]
        assert settings["max_batch"] == 4 and settings["max_batch_delay_ms"] == 3 and settings["workers"] == 2
        assert all(w["warmup"]["batch"] == 4 for w in status["workers"])  # each batcher's largest pass
        config = json.loads(http_get(oip.load_instance(state), "/v2/models/digits/config")[1])
        assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 3000
        assert '"max_batch_delay_ms": 3' in (state / "logs" / oip.LOG).read_text()  # the startup log's line
        again = cli(*start, "--runtime", "oip", "--inference-port", free_ports(1)[0])
        assert again.returncode == 1 and "already running" in again.stderr
        lt = cli(
            "loadtest", "--state-dir", state, "--concurrency", "1,4", "--requests", "100", "--out", tmp_path / "lt"
        )
        assert lt.returncode == 0, lt.stderr[-2000:]
        levels = json.loads((tmp_path / "lt" / "loadtest.json").read_text())["levels"]
        assert [lv["requests"] for lv in levels] == [100, 100] and all(not lv["errors"] for lv in levels)
        assert all(lv["accuracy"] > 0.9 and lv["server"]["requests"] >= 100 for lv in levels)
        assert "no token" in cli("serve", "key", "--state-dir", state).stderr
        admin = cli("serve", "key", "--state-dir", state, "--api", "admin").stdout.strip()
        assert len(admin) >= 32 and admin == (state / "admin-token").read_text().strip() and admin in r.stdout
    finally:
        stopped = cli("serve", "stop", "--state-dir", state)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert oip.pid(state) is None and not json.loads(cli("serve", "status", "--state-dir", state).stdout)["running"]


def test_taken_ports_fail_clearly(server, tmp_path):
    cfg = oip.OIPConfig.on_free_ports(server.export_dir, "mnist", str(tmp_path), grpc_port=server.grpc_port)
    with pytest.raises(ServerError, match="for gRPC"):
        oip.start(cfg, timeout=30)
    cfg = oip.OIPConfig.on_free_ports(server.export_dir, "mnist", str(tmp_path), http_port=server.http_port)
    with pytest.raises(ServerError, match="for REST"):
        oip.start(cfg, timeout=30)
    assert oip.status(server.state_dir)["ready"]


ADAPTER_CHECK = r"""
import asyncio, importlib, inspect, json, sys
from torchship.handlers.kserve import adapter as a
found = {}
for path in a.PATCHED:
    module, _, attr = path.rpartition(".")
    try:
        owner = importlib.import_module(module)
    except ImportError:
        module, _, name = module.rpartition(".")
        owner = getattr(importlib.import_module(module), name)
    found[path] = hasattr(owner, attr)
from kserve.protocol.infer_type import InferRequest
signature = list(inspect.signature(InferRequest.from_bytes).parameters)
image = open(sys.argv[2], "rb").read()
blob = len(image).to_bytes(4, "little") + image
header = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                 "parameters": {"binary_data_size": len(blob)}}]}).encode()
try:
    mangled = InferRequest.from_bytes(header + blob, len(header), "m").inputs[0].data[0] != image
except Exception:
    mangled = True
a.patch_kserve("127.0.0.1")
model = a.KServeModel("m", sys.argv[1])
model.load()
reply = asyncio.run(model.predict(InferRequest.from_bytes(header + blob, len(header), "m")))
label = [o for o in reply.outputs if o.name == "label"][0].as_numpy().tolist()
print(json.dumps({"found": found, "signature": signature, "stock_mangles": mangled, "label": label}))
"""


def test_the_kserve_adapter_answers_and_its_patches_are_still_needed(convnet_export, tmp_path):
    """In a process of its own (kserve's and tritonclient's protos both define package `inference`): each name the
    adapter patches still exists, from_bytes keeps its signature, stock kserve still mangles binary BYTES (else the
    patch can go), and the adapter answers a tritonclient-style binary request with the embedding's label."""
    (tmp_path / "digit.png").write_bytes(DIGIT)
    args = [str(convnet_export.directory), str(tmp_path / "digit.png")]
    r = subprocess.run([sys.executable, "-c", ADAPTER_CHECK, *args], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert all(out["found"].values()), out["found"]
    assert out["signature"] == ["req_bytes", "json_length", "model_name"]
    assert out["stock_mangles"], "kserve now keeps binary BYTES raw: patch_kserve's from_bytes can go"
    assert [str(x) for x in out["label"]] in (["0"], ["b'0'"]) or out["label"] == [b"0".decode()]
