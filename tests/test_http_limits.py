"""The OIP server against a hostile or broken client, on raw sockets: each case of issue 23's list asserts the status or
the close, and that a valid request is still answered afterwards. Limits are made small where waiting for the
defaults (60 s timeouts, 1,024 connections) would only cost time: the code that enforces them is the same."""

import base64
import json
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from tritonclient.utils import InferenceServerException

from torchship.handlers.oip.config import Limits
from torchship.serve import oip
from torchship.serve.process import free_ports
from torchship.serve.samples import held_out_digits, png

from helpers import ROOT, scrape, wait_for

DIGIT = png(held_out_digits()[0][0])
HEAD = Limits().head_bytes
FAST = {"workers": 1, "max_batch": 8, "max_batch_delay_ms": 1, "threads": 1}  # nothing to measure: starts in seconds


def start(export, state, **limits):
    cfg = oip.OIPConfig.on_free_ports(str(export), "mnist", str(state), limits=Limits(**limits), **FAST)
    return oip.start(cfg, 120)


@pytest.fixture(scope="module")
def capped(tmp_path_factory, convnet_export):
    """A server that holds 6 connections, stops reading past 64 KiB of unsent answers or 8 waiting requests."""
    state = tmp_path_factory.mktemp("capped")
    cfg = start(convnet_export.directory, state, connections=6, unsent_bytes=65536, pipelined=8)
    yield cfg
    oip.stop(state)


@pytest.fixture(scope="module")
def strict(tmp_path_factory, convnet_export):
    """A server whose every client deadline is 1 s."""
    state = tmp_path_factory.mktemp("strict")
    cfg = start(
        convnet_export.directory,
        state,
        header_timeout_s=1,
        body_timeout_s=1,
        idle_timeout_s=1,
        send_timeout_s=1,
        unsent_bytes=65536,
    )
    yield cfg
    oip.stop(state)


class Client:
    """A raw HTTP/1.1 connection that reads answers one at a time by their content-length."""

    def __init__(self, port: int, rcvbuf: int | None = None):
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(60)  # a guard against a hang, never what a test waits for
        self.sock.connect(("127.0.0.1", port))
        self.buf = b""

    def send(self, data: bytes) -> "Client":
        self.sock.sendall(data)
        return self

    def _fill(self) -> bool:
        try:
            chunk = self.sock.recv(1 << 20)
        except ConnectionResetError:
            chunk = b""
        self.buf += chunk
        return bool(chunk)

    def answer(self) -> tuple[int, dict, bytes] | None:
        """The next answer (status, headers, body), or None if the server closed first."""
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                return None
        head, rest = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        size = int(headers.get("content-length", 0))
        while len(rest) < size:
            if not self._fill():
                return None
            rest = self.buf.split(b"\r\n\r\n", 1)[1]
        self.buf, self.last = rest[size:], self.buf[: len(head) + 4 + size]
        return int(lines[0].split()[1]), headers, rest[:size]

    def closed(self) -> bool:
        """True once the server has closed (everything it sent read first)."""
        while self._fill():
            pass
        return True

    def close(self) -> None:
        self.sock.close()


def request(method: str, path: str, body: bytes = b"", headers: dict | None = None, version: str = "1.1") -> bytes:
    head = {"Host": "x", **({"Content-Length": str(len(body))} if body or method == "POST" else {}), **(headers or {})}
    return (
        f"{method} {path} HTTP/{version}\r\n".encode()
        + b"".join(f"{k}: {v}\r\n".encode() for k, v in head.items())
        + b"\r\n"
        + body
    )


LIVE = request("GET", "/v2/health/live")
INFER_BODY = json.dumps(
    {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(DIGIT).decode()]}]}
).encode()
INFER = request("POST", "/v2/models/mnist/infer", INFER_BODY)


def served(port: int) -> None:
    """A fresh client's inference is answered: whatever came before did no lasting harm."""
    c = Client(port).send(INFER)
    status, _, body = c.answer()
    c.close()
    assert status == 200 and json.loads(body)["outputs"][1]["data"] == ["0"], body[:300]


def refused(c: Client, status: int, words: str) -> None:
    got = c.answer()
    assert got is not None and got[0] == status and words in json.loads(got[2])["error"], got
    assert got[1].get("connection") == "close" and c.closed()


# 1. write backpressure


def test_a_client_that_reads_nothing_is_read_no_further_then_answered_in_full(capped):
    """It pipelines 200,000 requests and reads nothing: the server stops reading it (the gauge of paused connections
    shows it) instead of holding every answer; once it reads, every answer arrives, in order."""
    n = 200_000  # 17 MB of answers: more than the kernel's buffers take, so the server's own bound is what fills
    c = Client(capped.http_port, rcvbuf=4096)
    sender = threading.Thread(target=c.send, args=(LIVE * n + INFER,), daemon=True)
    sender.start()
    wait_for(
        lambda: scrape(capped.http_port, "torchship_http_connections", state="paused") == 1,
        60,
        "the server to stop reading the client that reads nothing",
    )
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)  # now read briskly
    one = raw_answer(capped.http_port, LIVE)
    while len(c.buf) < len(one) * n:
        assert c._fill(), f"closed after {len(c.buf) // len(one)} of {n} answers"
    assert c.buf[: len(one) * n] == one * n  # every answer, byte for byte, in order
    c.buf = c.buf[len(one) * n :]
    status, _, body = c.answer()
    assert status == 200 and json.loads(body)["outputs"][1]["data"] == ["0"]  # the last one asked, the last answered
    sender.join()
    assert scrape(capped.http_port, "torchship_http_connections", state="paused") == 0
    c.close()
    served(capped.http_port)


def raw_answer(port: int, data: bytes) -> bytes:
    """The bytes of the one answer DATA gets on a connection of its own."""
    c = Client(port).send(data)
    c.answer()
    c.close()
    return c.last


def test_a_client_that_never_reads_is_dropped_after_the_send_timeout(strict):
    c = Client(strict.http_port, rcvbuf=4096)
    errors = []

    def flood():
        try:
            c.send(LIVE * 200_000)
        except OSError as e:  # reset: the server dropped us
            errors.append(e)

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    sender.join(120)
    assert not sender.is_alive() and errors, "the server kept a client that read none of its answers"
    c.close()
    served(strict.http_port)


# 2. the request line and headers: bounded, counted as they arrive, repeats counted


@pytest.mark.parametrize(
    "head,status",
    [
        (request("GET", "/" + "a" * (HEAD + 1)), 414),
        (request("GET", "/v2/health/live", headers={"X-Big": "a" * (HEAD + 1)}), 431),
        (b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + b"X-Same: a\r\n" * 100 + b"\r\n", 431),
        (b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + b"X-" + b"a" * (HEAD + 1) + b": 1\r\n\r\n", 431),
    ],
    ids=["long url", "long value", "101 lines of one header", "long name"],
)
def test_oversized_heads_are_refused(capped, head, status):
    refused(Client(capped.http_port).send(head), status, "over")
    served(capped.http_port)


def test_a_head_at_the_limits_is_served(capped):
    lines = b"".join(b"X-%d: %s\r\n" % (i, b"a" * 100) for i in range(99))  # Host + 99 = 100 lines, ~10 KB
    c = Client(capped.http_port).send(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n")
    assert c.answer()[0] == 200
    c.close()


def test_an_endless_header_value_is_refused_as_it_arrives(capped):
    """16 MiB of one header value, never finished: refused after the first few pieces, not held for the header
    timeout (nor joined piece by piece, which costs httptools time quadratic in its size)."""
    c = Client(capped.http_port).send(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Endless: ")
    sent = 0
    try:
        while sent < 16 << 20:
            c.send(b"a" * 65536)
            sent += 65536
    except OSError:
        pass  # closed by the server mid-way, as it should be
    refused(c, 431, "over")
    served(capped.http_port)


# 3-5. pipelining: a loop, in order, malformed requests and 100-continue in turn, trailers discarded


def test_a_thousand_requests_pipelined_behind_an_inference_are_answered_in_order(capped):
    c = Client(capped.http_port).send(INFER + LIVE * 1000 + INFER)
    answers = [c.answer() for _ in range(1002)]
    assert [a[0] for a in answers] == [200] * 1002
    assert b"outputs" in answers[0][2] and b"outputs" in answers[-1][2]
    assert {a[2] for a in answers[1:-1]} == {b'{"live":true}'}
    assert c.send(LIVE).answer()[0] == 200  # and the connection is still there
    c.close()


def test_a_malformed_request_is_answered_after_the_valid_ones_before_it(capped):
    c = Client(capped.http_port).send(INFER + LIVE + b"GARBAGE\r\n\r\n")
    first, second = c.answer(), c.answer()
    assert first[0] == 200 and b"outputs" in first[2] and second[0] == 200
    refused(c, 400, "malformed")
    served(capped.http_port)


def test_100_continue_goes_out_in_turn_and_only_to_http_1_1(capped):
    expecting = request(
        "POST", "/v2/models/mnist/infer", headers={"Expect": "100-continue", "Content-Length": str(len(INFER_BODY))}
    )
    c = Client(capped.http_port).send(INFER + expecting)
    first = c.answer()
    assert first[0] == 200 and b"outputs" in first[2]
    interim = c.answer()  # 100 Continue comes after the answer to the request before it, never before
    assert interim[0] == 100
    assert c.send(INFER_BODY).answer()[0] == 200
    c.close()
    old = request(
        "POST",
        "/v2/models/mnist/infer",
        headers={"Expect": "100-continue", "Content-Length": str(len(INFER_BODY))},
        version="1.0",
    )
    c = Client(capped.http_port).send(old)
    c.send(INFER_BODY)  # an HTTP/1.0 client cannot know 100 Continue: it sends the body anyway
    status, headers, _ = c.answer()
    assert status == 200 and not c.buf and c.closed()  # no interim answer; HTTP/1.0 closes


def test_http_1_0_with_transfer_encoding_is_refused_and_closed(capped):
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(INFER_BODY), INFER_BODY)
    refused(
        Client(capped.http_port).send(
            b"POST /v2/models/mnist/infer HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
        ),
        400,
        "HTTP/1.0",
    )
    served(capped.http_port)


def test_trailers_are_discarded_never_merged_into_the_headers(capped):
    """A trailing Inference-Header-Content-Length would make this valid JSON body a 400 if it were acted on."""
    chunked = b"%x\r\n%s\r\n0\r\nInference-Header-Content-Length: 5\r\n\r\n" % (len(INFER_BODY), INFER_BODY)
    c = Client(capped.http_port).send(
        b"POST /v2/models/mnist/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
    )
    status, _, body = c.answer()
    assert status == 200 and b"outputs" in body, body[:300]
    c.close()


# 6-7. v2 header lies; unknown versions


@pytest.mark.parametrize("length", ["9" * 5000, "abc", "-1", "0", str(len(INFER_BODY) + 1), "99999999999999999999"])
def test_header_length_lies_are_400_and_leave_no_request_in_flight(capped, length):
    c = Client(capped.http_port).send(
        request("POST", "/v2/models/mnist/infer", INFER_BODY, {"Inference-Header-Content-Length": length})
    )
    status, _, body = c.answer()
    c.close()
    assert status == 400 and "inference-header-content-length" in json.loads(body)["error"].lower(), body
    assert scrape(capped.http_port, "torchship_requests_in_flight") == 0
    served(capped.http_port)


def test_unknown_versions_are_404_over_rest_and_grpc(capped):
    for path in ("/v2/models/mnist/versions/999999", "/v2/models/mnist/versions/999999/ready"):
        c = Client(capped.http_port).send(request("GET", path))
        assert c.answer()[0] == 404
        c.close()
    c = Client(capped.http_port).send(request("POST", "/v2/models/mnist/versions/999999/infer", INFER_BODY))
    status, _, body = c.answer()
    assert status == 404 and "version" in json.loads(body)["error"]
    assert c.send(request("POST", "/v2/models/mnist/versions/1/infer", INFER_BODY)).answer()[0] == 200
    c.close()
    g = tgrpc.InferenceServerClient(f"127.0.0.1:{capped.grpc_port}")
    inp = tgrpc.InferInput("images", [1], "BYTES")
    inp.set_data_from_numpy(np.array([DIGIT], dtype=object))
    with pytest.raises(InferenceServerException) as e:
        g.infer("mnist", [inp], model_version="999999")
    assert "NOT_FOUND" in str(e.value.status())
    with pytest.raises(InferenceServerException) as e:
        g.get_model_metadata("mnist", model_version="999999")
    assert "NOT_FOUND" in str(e.value.status())
    assert g.infer("mnist", [inp], model_version="1").as_numpy("label").tolist() == [b"0"]


# 8. element counts before any element is read; a bounded decode pool


def two_million_empty_elements():
    blob = b"\0\0\0\0" * 2_000_000
    header = json.dumps(
        {
            "inputs": [
                {"name": "images", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(blob)}}
            ]
        }
    ).encode()
    claimed = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "BYTES",
                    "shape": [2_000_000],
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        }
    ).encode()
    as_json = json.dumps(
        {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [""] * 2_000_000}]}
    ).encode()
    return {
        "binary, shape lies": request(
            "POST", "/v2/models/mnist/infer", header + blob, {"Inference-Header-Content-Length": str(len(header))}
        ),
        "binary, shape says so": request(
            "POST", "/v2/models/mnist/infer", claimed + blob, {"Inference-Header-Content-Length": str(len(claimed))}
        ),
        "json": request("POST", "/v2/models/mnist/infer", as_json),
    }


@pytest.mark.parametrize("case", list(two_million_empty_elements()))
def test_two_million_empty_elements_are_refused_by_their_count(capped, case):
    c = Client(capped.http_port).send(two_million_empty_elements()[case])
    status, _, body = c.answer()
    c.close()
    assert status == 413 and "at most 256" in json.loads(body)["error"], body[:300]
    served(capped.http_port)


def test_two_million_empty_grpc_elements_are_refused_by_their_count(capped):
    g = tgrpc.InferenceServerClient(f"127.0.0.1:{capped.grpc_port}")
    inp = tgrpc.InferInput("images", [2_000_000], "BYTES")
    inp.set_data_from_numpy(np.array([b""] * 2_000_000, dtype=object))
    with pytest.raises(InferenceServerException) as e:
        g.infer("mnist", [inp])
    assert "RESOURCE_EXHAUSTED" in str(e.value.status()) and "at most 256" in str(e.value)


# 9. timeouts: slow heads and stalled bodies get 408, reads are timed one by one, idle keep-alive is closed


@pytest.mark.parametrize(
    "partial,words",
    [
        (b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n", "header"),
        (request("POST", "/v2/models/mnist/infer", INFER_BODY)[:-10], "body"),
    ],
    ids=["slow head", "stalled body"],
)
def test_slow_heads_and_stalled_bodies_get_408_and_a_close(strict, partial, words):
    refused(Client(strict.http_port).send(partial), 408, words)
    served(strict.http_port)


def test_a_slow_but_steady_upload_is_timed_between_reads_not_over_the_body(strict):
    """Eight pieces 0.4 s apart: 2.8 s of upload against a 1 s body timeout, each read well within it."""
    import time

    whole = request("POST", "/v2/models/mnist/infer", INFER_BODY)
    c = Client(strict.http_port)
    step = len(whole) // 8 + 1
    for i in range(0, len(whole), step):
        c.send(whole[i : i + step])
        time.sleep(0.4)  # the client's pace, not a wait for the server
    status, _, body = c.answer()
    assert status == 200 and b"outputs" in body
    c.close()


def test_an_idle_keep_alive_connection_is_closed(strict):
    c = Client(strict.http_port).send(LIVE)
    assert c.answer()[0] == 200 and c.closed() and not c.buf  # closed silently once idle


# 10. a cap on connections per worker


def test_connections_past_the_cap_get_503_and_the_others_are_still_served(capped):
    cap = 6
    wait_for(
        lambda: scrape(capped.http_port, "torchship_http_connections", state="open") == 1,
        60,
        "every earlier test's connection to close (the scrape itself is the one open)",
    )
    held = [Client(capped.http_port) for _ in range(cap - 1)]
    assert scrape(capped.http_port, "torchship_http_connections", state="open") == cap  # and the scrape's
    held.append(Client(capped.http_port))  # the cap: accepted before the next, in the order they connected
    over = Client(capped.http_port)
    status, headers, body = over.answer()
    assert status == 503 and headers.get("retry-after") == "1" and "limit" in json.loads(body)["error"]
    assert over.closed()
    assert held[0].send(INFER).answer()[0] == 200  # the connections within the cap are served
    held.pop().close()
    wait_for(
        lambda: (c := Client(capped.http_port).send(LIVE).answer()) and c[0] == 200,
        60,
        "a new connection once one of the capped ones closed",
    )
    for c in held:
        c.close()


# 8 again: a client that goes away while its request is queued


def gated_worker(export_dir, cwd, *flags: str):
    """One worker whose forward passes wait for a line on its stdin (tests/gated_worker.py): (process, ports)."""
    http_port, grpc_port = free_ports(2)
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests" / "gated_worker.py"),
            f"--model_dir={export_dir}",
            "--model_name=mnist",
            f"--http_port={http_port}",
            f"--grpc_port={grpc_port}",
            "--max_batch_delay_ms=0",
            "--threads=1",
            "--log_level=WARNING",
            *flags,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=cwd,
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc, http_port, grpc_port


@pytest.fixture
def gated(convnet_export, tmp_path):
    proc, http_port, grpc_port = gated_worker(convnet_export.directory, tmp_path, "--max_batch=8")
    try:
        yield proc, http_port, grpc_port
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_past_the_queue_bound_clients_get_503_with_retry_after_never_a_hang(convnet_export, tmp_path, protocol):
    """A holds the one pass, B fills the queue of one, so C is told when to come back (REST: 503 with Retry-After;
    gRPC: UNAVAILABLE), the same admission rule for both (handlers/oip/pipeline.py); once the pass ends, A and B are
    answered and a new request is too."""
    proc, http_port, grpc_port = gated_worker(convnet_export.directory, tmp_path, "--max_batch=1", "--max_queue=1")
    try:
        first = Client(http_port).send(INFER)
        assert proc.stdout.readline().strip() == "pass 1"  # A's pass has begun, and waits
        second = Client(http_port).send(INFER)
        wait_for(lambda: scrape(http_port, "torchship_requests_in_flight") == 2, 60, "B queued behind A's pass")
        if protocol == "rest":
            third = Client(http_port).send(INFER)
            status, headers, body = third.answer()
            third.close()
            assert status == 503 and headers["retry-after"] == "1" and "retry" in json.loads(body)["error"]
        else:
            g = tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
            inp = tgrpc.InferInput("images", [1], "BYTES")
            inp.set_data_from_numpy(np.array([DIGIT], dtype=object))
            with pytest.raises(InferenceServerException) as e:
                g.infer("mnist", [inp])
            assert e.value.status() == "StatusCode.UNAVAILABLE" and "retry" in e.value.message()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert first.answer()[0] == second.answer()[0] == 200
        first.close()
        second.close()
        after = Client(http_port).send(INFER)
        assert after.answer()[0] == 200  # and once the burst is over, all is well
        after.close()
        protocol_label = "rest" if protocol == "rest" else "grpc"
        assert scrape(http_port, "torchship_requests_total", status=503, protocol=protocol_label) == 1
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_a_request_whose_client_went_away_leaves_the_queue_before_the_pass(gated, protocol):
    """A holds the one forward pass; B waits behind it and goes away (REST: the connection closes; gRPC: the call is
    cancelled). B is counted as abandoned (499), never as answered or failed, and its rows never reach the model."""
    proc, http_port, grpc_port = gated
    first = Client(http_port).send(INFER)
    assert proc.stdout.readline().strip() == "pass 1"  # A's pass has begun, and waits
    if protocol == "rest":
        second = Client(http_port).send(INFER)
    else:
        g = tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        inp = tgrpc.InferInput("images", [1], "BYTES")
        inp.set_data_from_numpy(np.array([DIGIT], dtype=object))
        call = g.async_infer("mnist", [inp], lambda result, error: None)
    wait_for(lambda: scrape(http_port, "torchship_requests_in_flight") == 2, 60, "B queued behind A's pass")
    second.close() if protocol == "rest" else call.cancel()
    wait_for(lambda: scrape(http_port, "torchship_requests_total", status=499) == 1, 60, "B counted as abandoned")
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert first.answer()[0] == 200
    first.close()
    assert scrape(http_port, "torchship_batch_size_count") == 1  # one pass ran: A's alone
    assert scrape(http_port, "torchship_batch_size_sum") == 1
    assert scrape(http_port, "torchship_requests_total") == 2  # A's 200 and B's 499: nothing else
    assert scrape(http_port, "torchship_requests_total", status=200) == 1
    assert scrape(http_port, "torchship_requests_in_flight") == 0


def named(body: bytes, output: str) -> list:
    return next(o["data"] for o in json.loads(body)["outputs"] if o["name"] == output)


def test_requests_that_arrive_during_a_pass_share_the_next_one_over_both_protocols(gated):
    """A holds the one forward pass; four REST and three gRPC requests arrive meanwhile and wait; once A's pass ends,
    the seven go through the model together, in one pass (max_batch 8), each answered as a lone request is."""
    proc, http_port, grpc_port = gated
    first = Client(http_port).send(INFER)
    assert proc.stdout.readline().strip() == "pass 1"  # A's pass has begun, and waits
    rest = [Client(http_port).send(INFER) for _ in range(4)]
    g = tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    inp = tgrpc.InferInput("images", [1], "BYTES")
    inp.set_data_from_numpy(np.array([DIGIT], dtype=object))
    answers: list = []
    calls = [g.async_infer("mnist", [inp], lambda result, error: answers.append((result, error))) for _ in range(3)]
    wait_for(lambda: scrape(http_port, "torchship_requests_in_flight") == 8, 60, "seven queued behind A's pass")
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "pass 7"  # the seven, together
    status, _, body = first.answer()
    label = named(body, "label")
    for c in rest:
        status_c, _, body_c = c.answer()
        assert (status_c, named(body_c, "label")) == (status, label) == (200, label)
        c.close()
    first.close()
    wait_for(lambda: len(answers) == 3, 60, "the three gRPC answers")
    assert all(error is None and result.as_numpy("label").tolist() == [label[0].encode()] for result, error in answers)
    assert len(calls) == 3 and scrape(http_port, "torchship_batch_size_count") == 2  # A's pass and the seven's
    g.close()
