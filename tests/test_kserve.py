"""The KServe runtime over the Open Inference Protocol, driven by tritonclient (REST and gRPC), a client no one
here wrote; and TorchServe's own v2 route through our handler."""

import base64
import http.client
import json
import subprocess

import numpy as np
import psutil
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from torchship.runtime.onnx_model import load as load_onnx
from torchship.runtime.responses import probabilities
from torchship.serve import kserve
from torchship.serve.process import ServerError, free_ports
from torchship.serve.samples import held_out_digits, png

from helpers import ROOT, TORCHSHIP

pytestmark = pytest.mark.serve
DIGITS, LABELS = held_out_digits()
FOUR = [0, 100, 200, 300]  # four classes: the held-out set is ordered by label
CLIENTS = {"http": thttp, "grpc": tgrpc}


@pytest.fixture(scope="module")
def runtime(tmp_path_factory, convnet_export):
    state = tmp_path_factory.mktemp("kserve-state")
    cfg = kserve.KServeConfig.on_free_ports(str(convnet_export.directory), "mnist", str(state))
    try:
        yield kserve.start(cfg, timeout=120)
    finally:
        p = kserve.pid(state)
        kserve.stop(state)
        assert kserve.pid(state) is None and (p is None or not psutil.pid_exists(p))


def client(cfg, kind):
    return CLIENTS[kind].InferenceServerClient(f"127.0.0.1:{cfg.http_port if kind == 'http' else cfg.grpc_port}")


def images_input(kind, blobs):
    inp = CLIENTS[kind].InferInput("images", [len(blobs)], "BYTES")
    inp.set_data_from_numpy(np.array(blobs, dtype=object))  # tritonclient's default: binary tensor data
    return inp


def text(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


@pytest.mark.parametrize("kind", list(CLIENTS))
def test_health_readiness_and_metadata(runtime, kind):
    c = client(runtime, kind)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("mnist")
    try:  # over HTTP an unknown model is not ready; over gRPC it is NOT_FOUND
        assert not c.is_model_ready("no-such-model")
    except InferenceServerException as e:
        assert kind == "grpc" and "NOT_FOUND" in str(e.status())
    meta = c.get_model_metadata("mnist")
    if kind == "grpc":
        meta = {
            "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in meta.inputs],
            "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in meta.outputs],
        }
    assert meta["inputs"] == [{"name": "images", "datatype": "BYTES", "shape": [-1]},
                              {"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]  # fmt: skip
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
                               {"name": "label", "datatype": "BYTES", "shape": [-1]}]  # fmt: skip


@pytest.mark.parametrize("kind", list(CLIENTS))
def test_four_digits_as_bytes_give_the_embeddings_labels(runtime, convnet_export, kind):
    blobs = [png(DIGITS[i]) for i in FOUR]
    result = client(runtime, kind).infer("mnist", [images_input(kind, blobs)])
    expected = [r["label"] for r in load_onnx(convnet_export.onnx).predict(blobs)]
    assert text(result.as_numpy("label")) == expected
    probs = result.as_numpy("probabilities")
    assert probs.shape == (4, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)


@pytest.mark.parametrize("kind", list(CLIENTS))
def test_the_fp32_input_gives_the_embeddings_probabilities(runtime, convnet_export, kind):
    model = load_onnx(convnet_export.onnx)
    x = np.stack([model.prepare(DIGITS[i]) for i in FOUR])
    inp = CLIENTS[kind].InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    probs = client(runtime, kind).infer("mnist", [inp]).as_numpy("probabilities")
    assert np.abs(probs - probabilities(model.card, model.run(x))).max() <= 1e-6


@pytest.mark.parametrize("kind", list(CLIENTS))
def test_one_bad_image_among_four_is_a_400_naming_index_and_reason(runtime, kind):
    blobs = [png(DIGITS[i]) for i in FOUR]
    blobs[2] = b"not an image at all"
    c = client(runtime, kind)
    with pytest.raises(InferenceServerException) as e:
        c.infer("mnist", [images_input(kind, blobs)])
    status = "400" if kind == "http" else "INVALID_ARGUMENT"
    assert status in str(e.value.status()) and "element 2" in str(e.value) and "accepted format" in str(e.value)
    assert c.is_model_ready("mnist")  # and it keeps answering
    assert len(c.infer("mnist", [images_input(kind, [png(DIGITS[5])])]).as_numpy("label")) == 1


def post(cfg, path: str, body: bytes, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", cfg.http_port, timeout=30)
    conn.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    out = r.status, r.read()
    conn.close()
    return out


def v2_json(*inputs) -> bytes:
    return json.dumps({"inputs": list(inputs)}).encode()


TRUNCATED = v2_json({"name": "images", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 50}})
BAD = [  # (name, body, extra headers, words in the 400's message)
    ("wrong input name", v2_json({"name": "pixels", "datatype": "FP32", "shape": [1, 1, 28, 28],
                                  "data": [0.0] * 784}), {}, "'images'"),
    ("wrong datatype", v2_json({"name": "input", "datatype": "INT32", "shape": [1, 1, 28, 28],
                                "data": [0] * 784}), {}, "must be FP32"),
    ("wrong shape", v2_json({"name": "input", "datatype": "FP32", "shape": [1, 28, 28], "data": [0.0] * 784}), {},
     "shape [N, 1, 28, 28]"),
    ("too few values", v2_json({"name": "input", "datatype": "FP32", "shape": [2, 1, 28, 28],
                                "data": [0.0] * 784}), {}, "values"),
    ("NaN", v2_json({"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28],
                     "data": [float("nan")] * 784}), {}, "NaN"),
    ("not base64", v2_json({"name": "images", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}), {}, "base64"),
    ("two inputs", v2_json({"name": "images", "datatype": "BYTES", "shape": [1], "data": ["aGk="]},
                           {"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.0] * 784}), {},
     "one input"),
    ("blank image", v2_json({"name": "images", "datatype": "BYTES", "shape": [1],
                             "data": [base64.b64encode(png(np.zeros((28, 28), np.uint8))).decode()]}), {}, "blank"),
    ("no inputs", b'{"id": "x"}', {"Inference-Header-Content-Length": "11"}, "inputs"),
    ("header length too long", b'{"inputs": []}', {"Inference-Header-Content-Length": "999",
                                                    "Content-Type": "application/octet-stream"}, "does not fit"),
    ("truncated binary", TRUNCATED + b"\x05\x00\x00\x00ab", {"Inference-Header-Content-Length": str(len(TRUNCATED))},
     "shorter"),
]  # fmt: skip


@pytest.mark.parametrize("name,body,headers,words", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_are_400_never_500(runtime, name, body, headers, words):
    status, reply = post(runtime, "/v2/models/mnist/infer", body, headers)
    assert status in (400, 422), (status, reply[:300])  # 422: FastAPI's own schema check of a JSON body
    if status == 400:
        assert words in json.loads(reply)["error"], reply[:300]


def test_a_public_bind_without_auth_in_front_is_refused(convnet_export, tmp_path):
    cfg = kserve.KServeConfig.on_free_ports(str(convnet_export.directory), "mnist", str(tmp_path), host="0.0.0.0")
    with pytest.raises(ServerError, match="no authentication"):
        kserve.start(cfg, timeout=30)
    assert kserve.pid(tmp_path) is None


def test_the_cli_lifecycle_and_load_test(convnet_export, tmp_path):
    state = tmp_path / "state"
    http_port, grpc_port = free_ports(2)

    def cli(*args):
        return subprocess.run([*TORCHSHIP, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=180)

    r = cli("serve", "start", "--runtime", "kserve", "--model", "digits", "--export-dir", convnet_export.directory,
            "--state-dir", state, "--inference-port", http_port, "--grpc-ports", grpc_port, grpc_port + 1)  # fmt: skip
    try:
        assert r.returncode == 0 and f"127.0.0.1:{http_port}/v2/models/digits" in r.stdout, r.stderr[-2000:]
        status = json.loads(cli("serve", "status", "--state-dir", state).stdout)
        assert status["running"] and status["ready"] and status["runtime"] == "kserve"
        again = cli("serve", "start", "--runtime", "kserve", "--model", "digits", "--export-dir",
                    convnet_export.directory, "--state-dir", state, "--inference-port", free_ports(1)[0])  # fmt: skip
        assert again.returncode == 1 and "already running" in again.stderr
        lt = cli("loadtest", "--state-dir", state, "--concurrency", "1,4", "--requests", "100", "--out",
                 tmp_path / "lt")  # fmt: skip
        assert lt.returncode == 0, lt.stderr[-2000:]
        levels = json.loads((tmp_path / "lt" / "loadtest.json").read_text())["levels"]
        assert [lv["requests"] for lv in levels] == [100, 100] and all(not lv["errors"] for lv in levels)
        assert all(lv["accuracy"] > 0.9 for lv in levels)
        assert "no tokens" in cli("serve", "key", "--state-dir", state).stderr
    finally:
        stopped = cli("serve", "stop", "--state-dir", state)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert kserve.pid(state) is None and not json.loads(cli("serve", "status", "--state-dir", state).stdout)["running"]
