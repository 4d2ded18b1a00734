"""End to end: train a tiny model, export, archive, run a real TorchServe on free ports, query it, stop it."""

import base64
import http.client
import io
import json
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from PIL import Image

from torchship.handlers.model.onnx_model import load as load_onnx
from torchship.serve import torchserve
from torchship.serve.archive import ModelConfig, build_archive
from torchship.serve.loadtest import Target, sweep
from torchship.serve.samples import held_out_digits, on_paper, png

DIGITS, LABELS = held_out_digits()


@pytest.fixture(scope="module")
def served(tmp_path_factory, convnet_export, bare_python):
    exp = convnet_export
    store = tmp_path_factory.mktemp("model_store")
    # a long batch delay so concurrent requests are sure to share a batch; one worker sees them all
    build_archive(exp.directory, store, config=ModelConfig(minWorkers=1, maxWorkers=1, batchSize=8, maxBatchDelay=150))
    state = tmp_path_factory.mktemp("state")
    cfg = torchserve.ServerConfig.on_free_ports("mnist-convnet", str(store), str(state), python=str(bare_python))
    try:
        cfg = torchserve.start(cfg, timeout=240)
        yield cfg, exp
    finally:
        java = torchserve.pid(state)
        torchserve.stop(state)
        assert torchserve.pid(state) is None
        assert java is None or not psutil.pid_exists(java)


def post(cfg, body: bytes, content_type="image/png", key=True, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", cfg.inference_port, timeout=60)
    h = {"Content-Type": content_type, **(headers or {})}
    if key:
        h.update(torchserve.headers(cfg.state_dir))
    conn.request("POST", f"/predictions/{cfg.model}", body, h)
    r = conn.getresponse()
    status, data = r.status, r.read()
    conn.close()
    return status, json.loads(data) if data else None


def multipart(field: str, data: bytes) -> tuple[bytes, str]:
    boundary = "torchshipboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="d.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def test_predictions_on_real_digits_equal_the_onnx_embedding(served):
    cfg, exp = served
    model = load_onnx(exp.onnx)
    for i in range(0, 1000, 40):
        for data in (png(DIGITS[i]), png(on_paper(DIGITS[i]))):
            status, body = post(cfg, data)
            assert status == 200
            local = model.predict(data)
            assert body["label"] == local["label"]
            assert abs(body["probability"] - local["probability"]) < 1e-4


def test_every_way_clients_send_images(served):
    cfg, _ = served
    digit = png(DIGITS[0])
    expected = post(cfg, digit)[1]["label"]
    form, ctype = multipart("data", digit)
    assert post(cfg, form, ctype) == (200, post(cfg, digit)[1])
    status, body = post(cfg, json.dumps({"data": base64.b64encode(digit).decode()}).encode(), "application/json")
    assert status == 200 and body["label"] == expected
    jpeg = io.BytesIO()
    Image.fromarray(on_paper(DIGITS[0])).convert("RGB").save(jpeg, format="JPEG")
    assert post(cfg, jpeg.getvalue(), "image/jpeg")[0] == 200
    status, body = post(cfg, digit, headers={"X-TopK": "5"})
    assert status == 200 and len(body["topk"]) == 5


def big_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (6000, 4000), 255).save(buf, format="PNG")
    return buf.getvalue()


BAD = [
    ("empty body", b"", "application/octet-stream", 400, "empty"),
    ("not an image", b"GIF89a-but-not-really", "application/octet-stream", 415, "not an image"),
    ("truncated", png(DIGITS[1])[:120], "image/png", 400, "truncated"),
    ("pixel bomb", big_png(), "image/png", 413, "too large"),
    ("bad base64", json.dumps({"data": "%%%"}).encode(), "application/json", 400, "base64"),
    ("json without data", json.dumps({"image": "x"}).encode(), "application/json", 400, "'data'"),
]


@pytest.mark.parametrize("name,body,ctype,status,message", BAD, ids=[b[0] for b in BAD])
def test_each_bad_input_gets_its_own_4xx_and_message(served, name, body, ctype, status, message):
    cfg, _ = served
    got, reply = post(cfg, body, ctype)
    assert got == status, (name, reply)
    assert message in reply["error"]


def test_a_batch_mixing_good_and_bad_inputs(served):
    """Sent at once, so TorchServe batches them into one handler call; the good ones must still succeed."""
    cfg, _ = served
    bodies = []
    for i in range(4):
        bodies.append((png(DIGITS[i * 100]), "image/png", 200))
        _, bad, ctype, status, _ = BAD[i]
        bodies.append((bad, ctype, status))
    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(lambda b: post(cfg, b[0], b[1]), bodies))
    assert [r[0] for r in results] == [b[2] for b in bodies]
    for (_, body), (_, _, want) in zip(results, bodies):
        assert ("label" in body) if want == 200 else ("error" in body)
    log = open(f"{cfg.state_dir}/logs/model_log.log").read()
    assert "Traceback" not in log  # no worker died on the bad inputs


def test_token_authorisation_is_on(served):
    cfg, _ = served
    status, body = post(cfg, png(DIGITS[0]), key=False)
    assert status in (400, 401, 403) and "Token" in body["message"]


def test_security_settings_of_the_running_server(served):
    cfg, _ = served
    props = open(f"{cfg.state_dir}/config.properties").read()
    assert "enable_model_api=false" in props and "127.0.0.1" in props and "allowed_urls=file://" in props
    conn = http.client.HTTPConnection("127.0.0.1", cfg.management_port, timeout=10)
    management = torchserve.headers(cfg.state_dir, "management")
    conn.request("POST", "/models?url=https://example.com/x.mar", headers=management)
    assert conn.getresponse().status >= 400  # registering models over HTTP is off


def test_load_test_counts_and_checks_answers(served):
    cfg, _ = served
    key = torchserve.keys(cfg.state_dir)["inference"]["key"]
    target = torchserve.load_target(cfg.state_dir)
    assert (target.port, target.key, target.metrics_url) == (cfg.inference_port, key, cfg.metrics_url)
    levels = sweep(target, (1, 4), duration=2, max_requests=60, warmup=5)
    for lv in levels:  # this archive waits 150 ms per batch: the 2 s bound stops the sweep before 60 requests
        assert 5 <= lv.requests <= 60 and not lv.errors
        assert lv.server["requests"] == lv.requests and lv.server["queue_ms"] > 0  # TorchServe's own metrics
        assert sum(a >= 0 for a in lv.answers) == min(lv.requests, 1000)  # which digits came back right
        assert lv.accuracy > 0.7 and lv.latency_ms["p50"] <= lv.latency_ms["p99"] <= lv.latency_ms["max"]
    open_loop = sweep(target, (8,), duration=3, max_requests=20, rate=10, warmup=0)[0]
    # on schedule: the 20th request is not sent before its time, 1.9 s after the first
    assert open_loop.mode == "open" and open_loop.requests == 20 and open_loop.seconds >= 19 / 10
    with pytest.raises(ValueError):
        Target("10.0.0.1", 80, "m")


def test_status_reports_ready_workers(served):
    cfg, _ = served
    st = torchserve.status(cfg.state_dir)
    assert st["running"] and st["workers"] and all(w["status"] == "READY" for w in st["workers"])
    assert psutil.pid_exists(st["pid"]) and st["model"] == cfg.model


def test_worker_logs_only_warnings_by_default(served):
    cfg, _ = served
    assert post(cfg, png(DIGITS[0]))[0] == 200
    log = open(f"{cfg.state_dir}/logs/model_log.log").read()
    assert "worker log level WARNING" in log  # the handler loaded and said so before turning the level down
    assert "Backend received inference" not in log and "[METRICS]PredictionTime" not in log


def test_a_second_instance_on_taken_grpc_ports_fails_clearly_and_leaves_nothing(served, tmp_path):
    cfg, _ = served
    # its own HTTP ports, but the running instance's gRPC ports
    second = torchserve.ServerConfig.on_free_ports(
        cfg.model,
        cfg.model_store,
        str(tmp_path / "state"),
        grpc_inference_port=cfg.grpc_inference_port,
        grpc_management_port=cfg.grpc_management_port,
    )
    with pytest.raises(torchserve.ServerError) as e:
        torchserve.start(second, timeout=120)
    assert "Address already in use" in str(e.value)
    marker = str((tmp_path / "state" / "tmp" / ".ts.sock").resolve())
    left = [p for p in psutil.process_iter(["cmdline"]) if any(marker in a for a in p.info["cmdline"] or [])]
    assert not left and torchserve.pid(tmp_path / "state") is None
    assert torchserve.status(cfg.state_dir)["running"]  # the first instance is untouched


def test_torchserves_v2_infer_route_speaks_the_protocol_through_our_handler(served):
    """TorchServe routes POST /v2/models/NAME/infer to the handler; tritonclient's binary form and plain v2 JSON
    both work there (its v2 health and model routes do not: see the README's endpoint table)."""
    import numpy as np
    import tritonclient.http as thttp
    from tritonclient.utils import InferenceServerException

    cfg, exp = served
    auth = torchserve.headers(cfg.state_dir)
    c = thttp.InferenceServerClient(f"127.0.0.1:{cfg.inference_port}")
    blobs = [png(DIGITS[i]) for i in (0, 100, 200, 300)]
    inp = thttp.InferInput("images", [4], "BYTES")
    inp.set_data_from_numpy(np.array(blobs, dtype=object))
    result = c.infer(cfg.model, [inp], headers=auth)
    expected = [r["label"] for r in load_onnx(exp.onnx).predict(blobs)]
    assert [str(x) for x in result.as_numpy("label")] == expected and result.as_numpy("probabilities").shape == (4, 10)
    body = {
        "id": "r7",
        "inputs": [
            {
                "name": "images",
                "datatype": "BYTES",
                "shape": [2],
                "data": [base64.b64encode(b).decode() for b in blobs[:2]],
            }
        ],
    }
    status, reply = post(cfg, json.dumps(body).encode(), "application/json")
    assert status == 200 and reply["id"] == "r7" and reply["outputs"][1]["data"] == expected[:2]
    blobs[1] = b"garbage"
    inp.set_data_from_numpy(np.array(blobs, dtype=object))
    with pytest.raises(InferenceServerException) as e:
        c.infer(cfg.model, [inp], headers=auth)
    assert "415" in str(e.value.status()) and "element 1" in str(e.value)  # the image's own status: not an image
