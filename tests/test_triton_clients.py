"""What Triton's own Python client examples call (triton-inference-server/client, src/python/examples), made by our
own tests with tritonclient against the OIP server, over HTTP and gRPC, on the models they need
(tests/triton_models.py). Triton's example files are not copied here: these tests make the same calls and check the
same answers."""

import json

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from torchship.serve import oip

CLIENTS = {"http": thttp, "grpc": tgrpc}
STRING_MODELS = ("simple_string", "simple_identity")  # BYTES in and out through their own step (--process)


@pytest.fixture(scope="module")
def simple(triton_exports):
    return triton_exports("simple")


@pytest.fixture(scope="module")
def server(tmp_path_factory, simple, triton_exports):
    state = tmp_path_factory.mktemp("triton-oip")
    more = tuple(str(triton_exports(name)) for name in STRING_MODELS + ("simple_int8", "custom_identity_int32"))
    cfg = oip.OIPConfig.on_free_ports(
        str(simple.parent), "simple", str(state), extra_exports=more, workers=2, max_batch=8, threads=1
    )
    cfg = oip.start(cfg, timeout=120)
    yield cfg
    oip.stop(state)


def client(cfg, kind):
    return CLIENTS[kind].InferenceServerClient(f"127.0.0.1:{cfg.http_port if kind == 'http' else cfg.grpc_port}")


def simple_inputs(kind, a: np.ndarray, b: np.ndarray) -> list:
    """As simple_*_infer_client.py sends them: INPUT0 as JSON (HTTP), INPUT1 as binary data."""
    inputs = [
        CLIENTS[kind].InferInput("INPUT0", list(a.shape), "INT32"),
        CLIENTS[kind].InferInput("INPUT1", list(b.shape), "INT32"),
    ]
    if kind == "http":
        inputs[0].set_data_from_numpy(a, binary_data=False)
        inputs[1].set_data_from_numpy(b, binary_data=True)
    else:
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(b)
    return inputs


def test_a_model_without_weights_and_with_only_integer_outputs_exports_with_its_proof(simple):
    """Triton's `simple` has no parameters (its state dict is empty) and answers INT32 only: the proof compares
    integer outputs exactly and writes its report; `torchship verify` says the same."""
    log = (simple.parent / "export.log").read_text()
    assert log.startswith("exit 0") and "all checks pass" in log, log[-3000:]
    report = json.loads((simple / "equivalence.json").read_text())
    assert report["passed"] and {c["output"] for c in report["checks"]} == {"OUTPUT0", "OUTPUT1"}
    assert all(c["atol"] == 0 and c["rtol"] == 0 and c["max_abs"] == 0 for c in report["checks"])


@pytest.mark.parametrize("kind", list(CLIENTS))
def test_simple_infer_client_sum_difference_statistics_and_an_unknown_model(server, kind):
    """simple_{http,grpc}_infer_client.py: the sum and the difference, with and without outputs named, the model's
    statistics, and Triton's phrase for a model the server does not have."""
    c = client(server, kind)
    a = np.arange(16, dtype=np.int32)[None]
    b = np.full((1, 16), -1, dtype=np.int32)
    before = c.get_inference_statistics(model_name="simple")
    outputs = [CLIENTS[kind].InferRequestedOutput("OUTPUT0"), CLIENTS[kind].InferRequestedOutput("OUTPUT1")]
    if kind == "http":
        outputs = [
            thttp.InferRequestedOutput("OUTPUT0", binary_data=True),
            thttp.InferRequestedOutput("OUTPUT1", binary_data=False),
        ]
    for asked in (outputs, None):
        result = c.infer("simple", simple_inputs(kind, a, b), outputs=asked)
        assert (result.as_numpy("OUTPUT0") == a + b).all() and (result.as_numpy("OUTPUT1") == a - b).all()
        assert result.as_numpy("OUTPUT0").dtype == np.int32
    stats = c.get_inference_statistics(model_name="simple")
    if kind == "grpc":  # the same shape as the JSON, as a message
        from google.protobuf import json_format

        stats, before = (json_format.MessageToDict(s, preserving_proto_field_name=True) for s in (stats, before))
    assert len(stats["model_stats"]) == 1 and stats["model_stats"][0]["name"] == "simple"
    now, then = stats["model_stats"][0], before["model_stats"][0] if before["model_stats"] else {}
    count = lambda s, *path: int(_get(s, *path) or 0)  # noqa: E731 - gRPC's JSON leaves zeros out
    assert count(now, "inference_count") - count(then, "inference_count") == 2  # rows
    assert count(now, "inference_stats", "success", "count") - count(then, "inference_stats", "success", "count") == 2
    assert count(now, "execution_count") > count(then, "execution_count")
    assert count(now, "inference_stats", "success", "ns") > count(then, "inference_stats", "success", "ns")
    assert any(int(b.get("batch_size", 0)) >= 1 for b in now["batch_stats"])
    for stage in ("compute_input", "compute_infer", "compute_output"):  # one each per answered request, as success
        assert count(now, "inference_stats", stage, "count") == count(now, "inference_stats", "success", "count")
        assert count(now, "inference_stats", stage, "ns") > count(then, "inference_stats", stage, "ns")
    with pytest.raises(InferenceServerException) as e:
        c.infer("wrong_model_name", simple_inputs(kind, a, b))
    assert e.value.message().startswith("Request for unknown model")


def _get(d, *path):
    for k in path:
        d = d.get(k, {}) if isinstance(d, dict) else {}
    return d if not isinstance(d, dict) else None


@pytest.mark.parametrize("kind", list(CLIENTS))
def test_statistics_of_every_model_of_one_version_and_of_a_version_that_is_not_there(server, kind):
    c = client(server, kind)
    every = c.get_inference_statistics()
    one = c.get_inference_statistics(model_name="simple", model_version="1")
    if kind == "grpc":
        from google.protobuf import json_format

        every, one = (json_format.MessageToDict(s, preserving_proto_field_name=True) for s in (every, one))
    names = ["custom_identity_int32", "simple", "simple_identity", "simple_int8", "simple_string"]
    assert sorted(s["name"] for s in every["model_stats"]) == names
    assert one["model_stats"][0]["version"] == "1"
    with pytest.raises(InferenceServerException) as e:
        c.get_inference_statistics(model_name="simple", model_version="7")
    assert "no version '7'" in e.value.message()


def test_the_statistics_route_of_each_url_form_over_plain_http(server):
    import urllib.request

    for path in ("/v2/models/stats", "/v2/models/simple/stats", "/v2/models/simple/versions/1/stats"):
        with urllib.request.urlopen(f"{server.inference_url}{path}", timeout=30) as r:
            body = json.loads(r.read())
        stat = body["model_stats"][0]
        assert set(stat) >= {
            "name",
            "version",
            "last_inference",
            "inference_count",
            "execution_count",
            "inference_stats",
            "batch_stats",
        }
        assert all(set(d) == {"count", "ns"} for d in stat["inference_stats"].values())


@pytest.mark.parametrize("name", ["simple", "simple_string"])
def test_serve_start_prints_a_request_a_named_input_model_answers(name, triton_exports, tmp_path):
    """Served from a folder of exports (NAME/ below it), the `try it` line is the model's own v2 request, and curl
    gets its answer (it used to post a digit image to a model that takes INPUT0 and INPUT1); a model with its own
    step sends the first of its examples (simple_string: strings)."""
    import subprocess

    from torchship.serve.process import free_ports

    from helpers import TORCHSHIP

    http_port, grpc_port = free_ports(2)
    state = tmp_path / "state"
    export = triton_exports(name)
    start = [*TORCHSHIP, "serve", "start", "--runtime", "oip", "--model", name, "--export-dir", export.parent]
    ports = ["--state-dir", state, "--inference-port", http_port, "--grpc-port", grpc_port, "--workers", 1]
    r = subprocess.run([*map(str, start), *map(str, ports)], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    try:
        assert r.returncode == 0, r.stderr[-2000:]
        line = r.stdout.split("try it", 1)[1].splitlines()[1].strip()
        assert line.startswith("curl") and "sample-v2.json" in line and f"/v2/models/{name}/infer" in line
        answer = json.loads(subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=60).stdout)
        assert [o["name"] for o in answer["outputs"]] == ["OUTPUT0", "OUTPUT1"], answer
        sent = json.loads((state / "sample-v2.json").read_text())["inputs"]
        a, b = (np.array(t["data"]).astype(int) for t in sent)  # simple_string's: the strings of its examples
        assert [o["datatype"] for o in answer["outputs"]] == ["BYTES" if name == "simple_string" else "INT32"] * 2
        assert np.array(answer["outputs"][0]["data"]).astype(int).tolist() == (a + b).reshape(-1).tolist()
    finally:
        subprocess.run([*TORCHSHIP, "serve", "stop", "--state-dir", state], capture_output=True, timeout=60)


def test_a_route_that_is_not_there_says_where_to_look(server):
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{server.inference_url}/v3/models", timeout=30)
    assert e.value.code == 404 and "GET /v2 lists" in json.loads(e.value.read())["error"]


def test_an_unproven_model_is_served_by_start_and_load_alike(simple, tmp_path):
    """One rule for start, load and route: a model none of whose versions has a passed proof is answered by its newest
    version, unproven (it used to be served at start but refused by load, so once unloaded it could not come back)."""
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(simple, repo / "simple" / "1")
    (repo / "simple" / "1" / "equivalence.json").unlink()
    cfg = oip.start(
        oip.OIPConfig.on_free_ports(
            str(repo), "simple", str(tmp_path / "state"), workers=1, max_batch=8, max_batch_delay_ms=1, threads=1
        ),
        timeout=120,
    )
    try:
        a = np.arange(16, dtype=np.int32)[None]
        c = client(cfg, "http")
        assert (c.infer("simple", simple_inputs("http", a, a)).as_numpy("OUTPUT0") == 2 * a).all()
        index = {r["version"]: r["reason"] for r in oip.repository_call(cfg.state_dir, "index")}
        assert "no proof" in index["1"]
        assert oip.repository_call(cfg.state_dir, "unload", "simple") == []
        rows = oip.repository_call(cfg.state_dir, "load", "simple")
        assert (
            [r["version"] for r in rows] == ["1"] and "default" in rows[0]["reason"] and "no proof" in rows[0]["reason"]
        )
        assert (c.infer("simple", simple_inputs("http", a, a)).as_numpy("OUTPUT1") == 0).all()
    finally:
        oip.stop(cfg.state_dir)


@pytest.mark.parametrize("request_coding,response_coding", [("gzip", "deflate"), ("deflate", "gzip"), (None, "gzip")])
def test_compressed_requests_and_answers_as_tritonclient_sends_and_reads_them(server, request_coding, response_coding):
    """simple_http_infer_client.py --request-compression-algorithm / --response-compression-algorithm."""
    a = np.arange(16, dtype=np.int32)[None]
    b = np.full((1, 16), -1, dtype=np.int32)
    result = client(server, "http").infer(
        "simple",
        simple_inputs("http", a, b),
        request_compression_algorithm=request_coding,
        response_compression_algorithm=response_coding,
    )
    assert (result.as_numpy("OUTPUT0") == a + b).all() and (result.as_numpy("OUTPUT1") == a - b).all()


def test_a_compressed_bomb_gets_a_413_and_another_coding_a_501(server):
    import gzip
    import http.client

    def post(body: bytes, coding: str):
        conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
        conn.request("POST", "/v2/models/simple/infer", body, {"Content-Encoding": coding})
        r = conn.getresponse()
        out = r.status, dict(r.getheaders()), json.loads(r.read())
        conn.close()
        return out

    bomb = gzip.compress(b'{"inputs": [' + b" " * (64 << 20) + b"]}")  # 64 MiB of JSON in 64 KiB
    status, _, body = post(bomb, "gzip")
    assert len(bomb) < 1 << 20 and status == 413 and "decompresses to more than" in body["error"]
    status, headers, body = post(b"whatever", "br")
    assert status == 501 and headers["accept-encoding"] == "gzip, deflate" and "'br'" in body["error"]
    a = np.arange(16, dtype=np.int32)[None]
    assert (client(server, "http").infer("simple", simple_inputs("http", a, a)).as_numpy("OUTPUT0") == 2 * a).all()


def strings(values) -> np.ndarray:
    """BYTES as the string examples build them: an object array of UTF-8 bytes."""
    x = np.asarray(values)
    return np.array([str(v).encode() for v in x.reshape(-1)], dtype=object).reshape(x.shape)


@pytest.mark.parametrize("kind", list(CLIENTS))
def test_the_string_models_as_the_string_examples_use_them(server, kind):
    """simple_{http,grpc}_string_infer_client.py: simple_string's integers as strings, one input as binary data and
    one as JSON (HTTP); simple_identity's strings back byte for byte, NULs inside and not UTF-8 too, as binary and as
    JSON. Their own steps (tests/triton_models.py) run in the server."""
    c = client(server, kind)
    meta = (
        c.get_model_metadata("simple_string", as_json=True) if kind == "grpc" else c.get_model_metadata("simple_string")
    )
    assert [(t["name"], t["datatype"]) for t in meta["inputs"]] == [("INPUT0", "BYTES"), ("INPUT1", "BYTES")]
    a, b = np.arange(16)[None], np.ones((1, 16), int)
    inputs = [CLIENTS[kind].InferInput(n, [1, 16], "BYTES") for n in ("INPUT0", "INPUT1")]
    if kind == "http":
        inputs[0].set_data_from_numpy(strings(a), binary_data=True)
        inputs[1].set_data_from_numpy(strings(b), binary_data=False)
        outputs = [thttp.InferRequestedOutput("OUTPUT0", binary_data=True), thttp.InferRequestedOutput("OUTPUT1")]
    else:
        inputs[0].set_data_from_numpy(strings(a))
        inputs[1].set_data_from_numpy(strings(b))
        outputs = [tgrpc.InferRequestedOutput("OUTPUT0"), tgrpc.InferRequestedOutput("OUTPUT1")]
    result = c.infer("simple_string", inputs, outputs=outputs)
    assert [int(v) for v in result.as_numpy("OUTPUT0").reshape(-1)] == list((a + b).reshape(-1))
    assert [int(v) for v in result.as_numpy("OUTPUT1").reshape(-1)] == list((a - b).reshape(-1))

    for sent in (
        np.array([[b"he\x00llo"] * 16], dtype=object),
        np.array([b"\x00\x01\x02\x03"] * 16, dtype=np.bytes_).reshape(1, 16),
        np.array([[b"\xff\xfe", "caf\u00e9".encode(), b""], [b"a", b"bc", b"def"]], dtype=object),
    ):
        for binary in (True, False) if kind == "http" else (True,):
            if not binary and any(b"\xff" in bytes(v) for v in sent.reshape(-1)):
                continue  # JSON carries text: bytes that are not UTF-8 go as binary data only
            x = CLIENTS[kind].InferInput("INPUT0", list(sent.shape), "BYTES")
            x.set_data_from_numpy(sent, **({"binary_data": binary} if kind == "http" else {}))
            want = [thttp.InferRequestedOutput("OUTPUT0", binary_data=binary)] if kind == "http" else None
            got = c.infer("simple_identity", [x], outputs=want).as_numpy("OUTPUT0")
            if not binary:  # JSON strings come back as text
                got = np.char.encode(got.astype(str))
            assert got.shape == sent.shape
            assert [bytes(v) for v in got.reshape(-1)] == [bytes(v) for v in sent.reshape(-1)], (binary, sent)


@pytest.mark.parametrize("kind", list(CLIENTS))
def test_a_string_that_is_no_integer_is_the_clients_400_and_names_the_step(server, kind):
    """simple_string's own step raises ValueError for text that is not an integer: a 400 with its message."""
    x = strings(np.arange(16)[None])
    x[0, 3] = b"three"
    inputs = [CLIENTS[kind].InferInput(n, [1, 16], "BYTES") for n in ("INPUT0", "INPUT1")]
    for t in inputs:
        t.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as e:
        client(server, kind).infer("simple_string", inputs)
    assert "preprocess" in e.value.message() and "three" in e.value.message()
    assert e.value.status() == ("400" if kind == "http" else "StatusCode.INVALID_ARGUMENT")


def test_grpc_explicit_byte_contents_as_the_explicit_byte_example_sends_them(server):
    """grpc_explicit_byte_content_client.py: simple_string's inputs as bytes_contents of a raw ModelInferRequest,
    its outputs read back as raw BYTES."""
    import grpc
    from tritonclient import utils
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name="simple_string")
    for name, values in (("INPUT0", range(16)), ("INPUT1", [1] * 16)):
        t = service_pb2.ModelInferRequest().InferInputTensor(name=name, datatype="BYTES", shape=[1, 16])
        t.contents.bytes_contents.extend(str(v).encode() for v in values)
        request.inputs.append(t)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    got = {
        o.name: utils.deserialize_bytes_tensor(raw) for o, raw in zip(response.outputs, response.raw_output_contents)
    }
    assert [int(v) for v in got["OUTPUT0"]] == [i + 1 for i in range(16)]
    assert [int(v) for v in got["OUTPUT1"]] == [i - 1 for i in range(16)]


@pytest.fixture(scope="module")
def local_admin(tmp_path_factory, simple, triton_exports):
    """A server started with --loopback_admin (the repository calls need no token from this machine) and
    --allow_client_shm (clients here may register shared memory)."""
    state = tmp_path_factory.mktemp("triton-local-admin")
    cfg = oip.OIPConfig.on_free_ports(
        str(simple.parent),
        "simple",
        str(state),
        workers=2,
        max_batch=8,
        threads=1,
        loopback_admin=True,
        allow_client_shm=True,
        extra_exports=(str(triton_exports("simple_string")),),
    )
    cfg = oip.start(cfg, timeout=120)
    yield cfg
    oip.stop(state)


@pytest.mark.parametrize("kind", list(CLIENTS))
def test_model_control_as_the_examples_do_it_on_a_server_that_lets_loopback_in(local_admin, server, kind):
    """simple_{http,grpc}_model_control.py: index, load, a load whose config is not JSON ("failed to load"), a load
    that sets max_batch_size 16 (and the configuration then says 16, every worker's passes and requests too), unload,
    and a model that is not there. The examples send no token: a server started without loopback_admin says 401."""
    c = client(local_admin, kind)
    index = c.get_model_repository_index() if kind == "http" else c.get_model_repository_index().models
    assert sorted(m["name"] if kind == "http" else m.name for m in index) == ["simple", "simple_string"]
    c.load_model("simple")
    assert c.is_model_ready("simple")
    with pytest.raises(InferenceServerException) as e:
        c.load_model("simple", config='"parameters": {"config": {{"max_batch_size": "16"}}}')
    assert "failed to load" in e.value.message() and "not JSON" in e.value.message()
    c.load_model("simple", config='{"max_batch_size":"16"}')
    config = c.get_model_config("simple")
    size = config["max_batch_size"] if kind == "http" else config.config.max_batch_size
    assert size == 16
    status = oip.status(local_admin.state_dir)
    assert all(w["ready"] for w in status["workers"])
    a = np.arange(16 * 17, dtype=np.int32).reshape(17, 16)
    with pytest.raises(InferenceServerException) as e:  # 17 rows: over what the load set
        c.infer("simple", simple_inputs(kind, a, a))
    assert "max_batch_size, 16" in e.value.message()
    assert (c.infer("simple", simple_inputs(kind, a[:16], a[:16])).as_numpy("OUTPUT0") == 2 * a[:16]).all()
    with pytest.raises(InferenceServerException) as e:
        c.load_model("simple", config='{"max_batch_size": 8, "instance_group": [{"count": 4}]}')
    assert "'instance_group'" in e.value.message()  # what it cannot honour, it names; the model is unchanged
    assert (
        c.get_model_config("simple")["max_batch_size"]
        if kind == "http"
        else c.get_model_config("simple").config.max_batch_size
    ) == 16
    c.load_model("simple")  # the model's own configuration again
    assert (
        c.get_model_config("simple")["max_batch_size"]
        if kind == "http"
        else c.get_model_config("simple").config.max_batch_size
    ) == 256
    c.unload_model("simple")
    assert not c.is_model_ready("simple")
    with pytest.raises(InferenceServerException) as e:
        c.load_model("wrong_model_name")
    assert "failed to load" in e.value.message()
    c.load_model("simple")
    with pytest.raises(InferenceServerException) as e:  # the token stays the default
        client(server, kind).load_model("simple")
    assert "admin token" in e.value.message()


def test_a_stream_of_ordinary_requests_is_answered_on_the_stream_errors_included(server):
    """tritonclient.grpc's start_stream / async_stream_infer (ModelStreamInfer) on an ordinary model: every request
    answered on the stream with its id, a bad one with its error, and the stream goes on."""
    import queue

    answers: queue.Queue = queue.Queue()
    c = client(server, "grpc")
    c.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        a = np.arange(16, dtype=np.int32)[None]
        for k in range(6):
            c.async_stream_infer("simple", simple_inputs("grpc", a + k, a), request_id=f"s{k}")
        bad = tgrpc.InferInput("INPUT0", [1, 16], "INT32")
        bad.set_data_from_numpy(a)
        c.async_stream_infer("simple", [bad], request_id="bad")  # INPUT1 missing
        c.async_stream_infer("simple", simple_inputs("grpc", a, a), request_id="after")
        got = [answers.get(timeout=60) for _ in range(8)]
    finally:
        c.stop_stream()
    ok = {r.get_response().id: r for r, e in got if e is None}
    errors = [e for r, e in got if e is not None]
    assert set(ok) == {*(f"s{k}" for k in range(6)), "after"}
    assert all((ok[f"s{k}"].as_numpy("OUTPUT0") == 2 * a + k).all() for k in range(6))
    assert len(errors) == 1 and "missing ['INPUT1']" in errors[0].message()


def identity_input(module, data: np.ndarray):
    x = module.InferInput("INPUT0", list(data.shape), "INT32")
    x.set_data_from_numpy(data)
    return [x]


@pytest.mark.parametrize("kind", list(CLIENTS))
def test_async_infer_as_the_async_examples_make_it(server, kind):
    """simple_*_async_infer_client.py and memory_growth_test.py's model: requests in flight together, each answer
    matched to its own request (HTTP: async_infer with a pool; gRPC: a callback), custom_identity_int32's rows of
    different lengths among them."""
    import queue

    a = np.arange(16, dtype=np.int32)[None]
    lengths = (1, 5, 16, 300)
    if kind == "http":
        c = thttp.InferenceServerClient(f"127.0.0.1:{server.http_port}", concurrency=4)
        simple = [c.async_infer("simple", simple_inputs(kind, a + k, a)) for k in range(8)]
        ident = [
            c.async_infer("custom_identity_int32", identity_input(thttp, np.arange(n)[None].astype(np.int32)))
            for n in lengths
        ]
        simple, ident = [r.get_result() for r in simple], [r.get_result() for r in ident]
        c.close()
    else:
        c, answers = client(server, kind), queue.Queue()
        for k in range(8):
            c.async_infer(
                "simple", simple_inputs(kind, a + k, a), lambda result, error, k=k: answers.put(("s", k, result, error))
            )
        for k, n in enumerate(lengths):
            x = identity_input(tgrpc, np.arange(n)[None].astype(np.int32))
            c.async_infer("custom_identity_int32", x, lambda result, error, k=k: answers.put(("i", k, result, error)))
        got = [answers.get(timeout=60) for _ in range(8 + len(lengths))]
        assert all(e is None for *_, e in got), [e for *_, e in got if e is not None]
        simple = [r for _, k, r, _ in sorted((g for g in got if g[0] == "s"), key=lambda g: g[1])]
        ident = [r for _, k, r, _ in sorted((g for g in got if g[0] == "i"), key=lambda g: g[1])]
    assert [(r.as_numpy("OUTPUT0") == 2 * a + k).all() for k, r in enumerate(simple)] == [True] * 8
    for n, r in zip(lengths, ident):
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), np.arange(n)[None])


@pytest.mark.parametrize("kind", list(CLIENTS))
def test_the_asyncio_clients_health_metadata_infer_and_stream(server, kind):
    """tritonclient.http.aio and tritonclient.grpc.aio, as the aio examples use them: health, metadata and
    configuration, infer, and (gRPC) stream_infer over an async iterator of requests."""
    import asyncio

    aio = __import__(f"tritonclient.{kind}.aio", fromlist=["InferenceServerClient"])
    url = f"127.0.0.1:{server.http_port if kind == 'http' else server.grpc_port}"
    a = np.arange(16, dtype=np.int32)[None]

    async def go():
        c = aio.InferenceServerClient(url)
        try:
            health = [await c.is_server_live(), await c.is_server_ready(), await c.is_model_ready("simple")]
            meta = (
                await c.get_model_metadata("simple", as_json=True)
                if kind == "grpc"
                else await c.get_model_metadata("simple")
            )
            config = (
                await c.get_model_config("simple", as_json=True)
                if kind == "grpc"
                else await c.get_model_config("simple")
            )
            result = await c.infer("simple", simple_inputs(kind, a, a + 3))
            streamed = []
            if kind == "grpc":

                async def requests():
                    for k in range(3):
                        yield {"model_name": "simple", "inputs": simple_inputs(kind, a + k, a), "request_id": str(k)}

                async for r, e in c.stream_infer(requests()):
                    streamed.append((r.get_response().id, r.as_numpy("OUTPUT1"), e))
        finally:
            await c.close()
        return health, meta, config, result, streamed

    health, meta, config, result, streamed = asyncio.run(go())
    assert health == [True, True, True]
    assert [i["name"] for i in meta["inputs"]] == ["INPUT0", "INPUT1"]
    config = config.get("config", config)  # gRPC's JSON wraps it
    assert config["name"] == "simple" and int(config["max_batch_size"]) >= 1
    assert (result.as_numpy("OUTPUT1") == -3).all()
    if kind == "grpc":
        assert sorted(i for i, _, _ in streamed) == ["0", "1", "2"]
        assert all(e is None and (d == int(i)).all() for i, d, e in streamed)


def test_grpc_channel_arguments_keepalive_headers_deadlines_and_compression_as_the_custom_args_examples_set_them(
    server,
):
    """simple_grpc_custom_args_client.py and simple_grpc_keepalive_client.py: custom channel arguments (message sizes,
    keepalive), KeepAliveOptions, a request's own headers, a client timeout, and gRPC's gzip and deflate message
    compression in both directions."""
    url = f"127.0.0.1:{server.grpc_port}"
    a, b = np.arange(16, dtype=np.int32)[None], np.full((1, 16), 3, np.int32)
    args = [
        ("grpc.max_send_message_length", 1 << 20),
        ("grpc.max_receive_message_length", 1 << 20),
        ("grpc.keepalive_time_ms", 2**31 - 1),
        ("grpc.keepalive_timeout_ms", 20000),
        ("grpc.keepalive_permit_without_calls", False),
        ("grpc.http2.max_pings_without_data", 2),
    ]
    keepalive = tgrpc.KeepAliveOptions(
        keepalive_time_ms=2**31 - 1,
        keepalive_timeout_ms=20000,
        keepalive_permit_without_calls=False,
        http2_max_pings_without_data=2,
    )
    for c in (
        tgrpc.InferenceServerClient(url, channel_args=args),
        tgrpc.InferenceServerClient(url, keepalive_options=keepalive),
    ):
        for compression in (None, "gzip", "deflate"):
            result = c.infer(
                "simple",
                simple_inputs("grpc", a, b),
                headers={"test": "1"},
                client_timeout=60,
                compression_algorithm=compression,
            )
            assert (result.as_numpy("OUTPUT0") == a + b).all() and (result.as_numpy("OUTPUT1") == a - b).all()
        c.close()


@pytest.mark.parametrize("kind", list(CLIENTS))
def test_int8_tensors_in_and_out_and_as_explicit_grpc_contents(server, kind):
    """grpc_explicit_int8_content_client.py's model: INT8 in and out, as binary data, as JSON, and (gRPC) as typed
    int_contents, which the protocol carries in 32 bits."""
    a = np.arange(-8, 8, dtype=np.int8)[None]
    b = np.full((1, 16), 3, dtype=np.int8)
    inputs = [CLIENTS[kind].InferInput(n, [1, 16], "INT8") for n in ("INPUT0", "INPUT1")]
    inputs[0].set_data_from_numpy(a, **({"binary_data": False} if kind == "http" else {}))
    inputs[1].set_data_from_numpy(b)
    result = client(server, kind).infer("simple_int8", inputs)
    assert result.as_numpy("OUTPUT0").dtype == np.int8 and (result.as_numpy("OUTPUT0") == a + b).all()
    assert (result.as_numpy("OUTPUT1") == a - b).all()
    if kind == "grpc":
        import grpc
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        request = service_pb2.ModelInferRequest(model_name="simple_int8")
        for name, x in (("INPUT0", a), ("INPUT1", b)):
            t = request.inputs.add(name=name, datatype="INT8", shape=[1, 16])
            t.contents.int_contents.extend(x.reshape(-1).tolist())
        stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}"))
        answer = stub.ModelInfer(request)
        out = dict(zip([o.name for o in answer.outputs], answer.raw_output_contents))
        assert (np.frombuffer(out["OUTPUT0"], np.int8) == (a + b).reshape(-1)).all()


@pytest.mark.parametrize("kind", list(CLIENTS))
def test_cuda_shared_memory_is_refused_with_a_message_that_says_why(server, kind):
    """simple_*_cudashm_client.py's first call: no GPU here, and the server says so instead of a bare UNIMPLEMENTED."""
    c = client(server, kind)
    with pytest.raises(InferenceServerException) as e:
        c.get_cuda_shared_memory_status()
    assert "CUDA shared memory is not served" in e.value.message() and "CPU" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        c.unregister_cuda_shared_memory()
    assert "CUDA shared memory is not served" in e.value.message()


@pytest.mark.parametrize("kind", list(CLIENTS))
def test_system_shared_memory_inputs_and_outputs_as_the_shm_examples_use_them(local_admin, server, kind):
    """simple_{http,grpc}_shm_client.py: inputs in one region, outputs written to another, the status of each, and
    unregistering; every worker maps what one registration names (requests may reach any of them)."""
    import os

    import tritonclient.utils.shared_memory as shm

    c = client(local_admin, kind)
    c.unregister_system_shared_memory()
    a = np.arange(16, dtype=np.int32)[None]
    b = np.full((1, 16), 5, dtype=np.int32)
    size = a.nbytes
    key = f"/torchship-test-{kind}-{os.getpid()}"
    ins = shm.create_shared_memory_region("in", f"{key}-in", 2 * size)
    outs = shm.create_shared_memory_region("out", f"{key}-out", 2 * size)
    try:
        shm.set_shared_memory_region(ins, [a, b])
        c.register_system_shared_memory("in", f"{key}-in", 2 * size)
        c.register_system_shared_memory("out", f"{key}-out", 2 * size)
        status = c.get_system_shared_memory_status()
        names = {r["name"] for r in status} if kind == "http" else set(status.regions)
        assert names == {"in", "out"}
        inputs = [CLIENTS[kind].InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
        inputs[0].set_shared_memory("in", size)
        inputs[1].set_shared_memory("in", size, offset=size)
        outputs = [CLIENTS[kind].InferRequestedOutput(n) for n in ("OUTPUT0", "OUTPUT1")]
        outputs[0].set_shared_memory("out", size)
        outputs[1].set_shared_memory("out", size, offset=size)
        for _ in range(4):  # over HTTP, connections land on either worker: each must have mapped both regions
            result = c.infer("simple", inputs, outputs=outputs)
            named = result.get_output("OUTPUT0")  # carries no data; gRPC names the region, REST nothing more
            if kind == "http":  # as Triton: perf_analyzer's C++ client reads any parameters as binary_data_size
                assert set(named) == {"name", "datatype", "shape"}
            else:
                assert named.parameters["shared_memory_region"].string_param == "out"
            assert (shm.get_contents_as_numpy(outs, np.int32, [1, 16]) == a + b).all()
            assert (shm.get_contents_as_numpy(outs, np.int32, [1, 16], offset=size) == a - b).all()
            b = b + 1
            shm.set_shared_memory_region(ins, [a, b])
        c.unregister_system_shared_memory("in")
        with pytest.raises(InferenceServerException) as e:  # an unregistered region is read no more
            c.infer("simple", inputs, outputs=outputs)
        assert "'in' is not registered" in e.value.message()
        c.unregister_system_shared_memory()
        status = c.get_system_shared_memory_status()
        assert not (status if kind == "http" else status.regions)
        with pytest.raises(InferenceServerException) as e:
            c.register_system_shared_memory("bad", "/../etc/passwd", 16)
        assert "directly under /dev/shm" in e.value.message()
        with pytest.raises(InferenceServerException) as e:
            c.register_system_shared_memory("big", f"{key}-in", 4 * size)
        assert "runs past" in e.value.message()
        with pytest.raises(InferenceServerException) as e:  # a server started without the option says which
            client(server, kind).register_system_shared_memory("in", f"{key}-in", 2 * size)
        assert "allow_client_shm" in e.value.message()
    finally:
        c.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(ins)
        shm.destroy_shared_memory_region(outs)


@pytest.mark.parametrize("kind", list(CLIENTS))
def test_strings_in_shared_memory_as_the_shm_string_examples_use_them(local_admin, kind):
    """simple_{http,grpc}_shm_string_client.py: simple_string's inputs serialized in their regions (Triton's BYTES
    layout), its outputs written to regions sized to exactly their serialized answers, read back with tritonclient."""
    import os

    import tritonclient.utils.shared_memory as shm
    from tritonclient import utils

    c = client(local_admin, kind)
    c.unregister_system_shared_memory()
    a, b = np.arange(16), np.ones(16, int)
    blobs = [utils.serialize_byte_tensor(strings(x)) for x in (a, b, a + b, a - b)]
    sizes = [utils.serialized_byte_size(x) for x in blobs]
    key = f"/torchship-strings-{kind}-{os.getpid()}"
    regions = [shm.create_shared_memory_region(f"r{i}", f"{key}-{i}", sizes[i]) for i in range(4)]
    try:
        for i in (0, 1):
            shm.set_shared_memory_region(regions[i], [blobs[i]])
        for i in range(4):
            c.register_system_shared_memory(f"r{i}", f"{key}-{i}", sizes[i])
        inputs = [CLIENTS[kind].InferInput(n, [1, 16], "BYTES") for n in ("INPUT0", "INPUT1")]
        outputs = [CLIENTS[kind].InferRequestedOutput(n) for n in ("OUTPUT0", "OUTPUT1")]
        for i in (0, 1):
            inputs[i].set_shared_memory(f"r{i}", sizes[i])
            outputs[i].set_shared_memory(f"r{i + 2}", sizes[i + 2])
        c.infer("simple_string", inputs, outputs=outputs)
        for i, want in ((2, a + b), (3, a - b)):
            got = shm.get_contents_as_numpy(regions[i], np.object_, [1, 16])
            assert [int(v) for v in got.reshape(-1)] == list(want)
    finally:
        c.unregister_system_shared_memory()
        for r in regions:
            shm.destroy_shared_memory_region(r)


@pytest.fixture(scope="module")
def images_server(tmp_path_factory, convnet_export):
    """The digit classifier as Triton's image examples want an image model (--triton_images)."""
    state = tmp_path_factory.mktemp("triton-images")
    cfg = oip.OIPConfig.on_free_ports(
        str(convnet_export.directory),
        "digits",
        str(state),
        workers=1,
        max_batch=8,
        threads=1,
        max_batch_delay_ms=1,
        triton_images=True,
    )
    cfg = oip.start(cfg, timeout=120)
    yield cfg
    oip.stop(state)


@pytest.mark.parametrize("kind", list(CLIENTS))
def test_image_client_checks_pass_and_its_classes_are_the_embeddings(images_server, convnet_export, kind):
    """image_client.py / grpc_image_client.py: one input and one output in the metadata, one input in the
    configuration, FORMAT_NCHW with 3 dimensions after the batch, an FP32 output; the image resized and sent as FP32
    NCHW (scaling NONE, as the example does), the top classes asked for by classification: the embedding's own."""
    from PIL import Image

    from torchship.handlers.model.onnx_model import load as load_onnx
    from torchship.handlers.model.responses import softmax
    from torchship.serve.samples import held_out_digits

    c = client(images_server, kind)
    meta, config = c.get_model_metadata("digits"), c.get_model_config("digits")
    if kind == "grpc":
        from google.protobuf import json_format

        meta = json_format.MessageToDict(meta, preserving_proto_field_name=True)
        config = json_format.MessageToDict(config.config, preserving_proto_field_name=True)
    assert len(meta["inputs"]) == 1 and len(meta["outputs"]) == 1 and len(config["input"]) == 1
    (inp,), (out,) = meta["inputs"], meta["outputs"]
    assert out["datatype"] == "FP32" and config["input"][0]["format"] == "FORMAT_NCHW" and len(inp["shape"]) == 4
    _, ch, h, w = (int(d) for d in inp["shape"])
    digits = held_out_digits()[0][:2]
    x = np.stack(
        [np.asarray(Image.fromarray(d).convert("L").resize((w, h), Image.BILINEAR), np.float32)[None] for d in digits]
    )
    assert x.shape == (2, ch, h, w)
    tensor = CLIENTS[kind].InferInput(inp["name"], list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = c.infer("digits", [tensor], outputs=[CLIENTS[kind].InferRequestedOutput(out["name"], class_count=3)])
    got = [[r.decode().split(":") for r in row] for row in result.as_numpy(out["name"])]
    want = softmax(load_onnx(convnet_export.onnx).run(x))
    for row, p in zip(got, want):
        top = np.argsort(-p)[:3]
        assert [int(i) for _, i, _ in row] == top.tolist() and [lab for _, _, lab in row] == [str(i) for i in top]
        assert abs(float(row[0][0]) - p[top[0]]) < 1e-5
    from torchship.serve.samples import png

    files = CLIENTS[kind].InferInput("images", [1], "BYTES")
    files.set_data_from_numpy(np.array([png(digits[0])], dtype=object))
    with pytest.raises(InferenceServerException, match="triton_images"):  # image files: not on this server
        c.infer("digits", [files])


def test_a_model_infer_message_that_is_not_protobuf_is_an_invalid_argument_naming_why(server):
    """Bytes that are not a ModelInferRequest (a field cut short, a wire type that does not exist) get
    INVALID_ARGUMENT saying what they are not (grpcio's own answer was UNKNOWN "Unexpected DecodeError"); the server
    goes on answering, unary and streaming."""
    import grpc
    from google.protobuf.message import DecodeError
    from tritonclient.grpc import service_pb2

    bad = [b"\x0a\x05sim", b"\x07"]
    for data in bad:  # what the test relies on: protobuf itself refuses these bytes
        with pytest.raises(DecodeError):
            service_pb2.ModelInferRequest.FromString(data)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        raw = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        for data in bad:
            with pytest.raises(grpc.RpcError) as e:
                raw(data, timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid ModelInferRequest message" in e.value.details(), e.value.details()
        stream = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        answers = list(stream(iter([bad[0]]), timeout=30))
        assert len(answers) == 1 and b"not a valid ModelInferRequest message" in answers[0]
    a = np.arange(16, dtype=np.int32)[None]
    assert (client(server, "grpc").infer("simple", simple_inputs("grpc", a, a)).as_numpy("OUTPUT0") == 2 * a).all()


def test_a_unary_call_of_two_messages_or_none_is_refused_and_the_server_goes_on(server):
    """A client streaming to a unary method (grpcio lets any method be called so): UNIMPLEMENTED, where the server
    would otherwise keep what it sends; then a call as it should be is answered."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        live = channel.stream_unary(
            "/inference.GRPCInferenceService/ServerLive",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        for messages in ([b"", b""], []):
            with pytest.raises(grpc.RpcError) as e:
                live(iter(messages), timeout=30)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED and "one request message" in e.value.details()
        assert live(iter([b""]), timeout=30) == b"\x08\x01"  # ServerLiveResponse(live=True)
