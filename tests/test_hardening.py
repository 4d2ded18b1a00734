"""The served model under overload, hostile input, a killed worker and a restart; real TorchServe, loopback only."""

import http.client
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from torchship.handlers.model.onnx_model import load as load_onnx
from torchship.serve import torchserve
from torchship.serve.archive import ModelConfig, build_archive
from torchship.serve.loadtest import Payload, Target, kill_worker_under_load, payloads, run_level
from torchship.serve.samples import held_out_digits, png

from helpers import wait_for
from hostile import DIGIT, HOSTILE, encode

DIGITS, _ = held_out_digits()
BATCH = ModelConfig().batchSize


def post(cfg, body: bytes, content_type="image/png", headers=None, key=True, model=None):
    conn = http.client.HTTPConnection("127.0.0.1", cfg.inference_port, timeout=60)
    h = {"Content-Type": content_type, **(torchserve.headers(cfg.state_dir) if key else {}), **(headers or {})}
    conn.request("POST", f"/predictions/{model or cfg.model}", body, h)
    r = conn.getresponse()
    status, data = r.status, r.read()
    conn.close()
    return status, json.loads(data) if data else None


@pytest.fixture(scope="module")
def hardened(tmp_path_factory, convnet_export, bare_python):
    """`make serve`'s defaults, started once, hit with unparseable JSON (its worker logs a traceback), stopped and
    started again on the same state directory: the restart the issue saw fail."""
    store, state = tmp_path_factory.mktemp("store"), tmp_path_factory.mktemp("state")
    build_archive(convnet_export.directory, store, config=ModelConfig())
    cfg = torchserve.ServerConfig.on_free_ports("mnist-convnet", str(store), str(state), python=str(bare_python))
    facts = {}
    try:
        cfg = torchserve.start(cfg, timeout=240)
        facts["bad json"] = [post(cfg, b'{"data": ', "application/json")[0] for _ in range(2)]
        torchserve.stop(state)
        facts["tracebacks before restart"] = (state / "logs" / "model_log.log").read_text().count("Traceback")
        cfg = torchserve.start(cfg, timeout=240)
        yield cfg, facts
    finally:
        torchserve.stop(state)
        assert torchserve.pid(state) is None


def test_a_restart_works_whatever_the_previous_run_logged(hardened):
    cfg, facts = hardened
    assert facts["bad json"] == [400, 400] and facts["tracebacks before restart"] >= 1
    assert post(cfg, png(DIGITS[0]))[0] == 200


def expected(convnet_export) -> list[Payload]:
    """Every held-out digit, labelled with what the embedding answers: a served answer must equal it."""
    model = load_onnx(convnet_export.onnx)
    bodies = payloads()
    labels = [r["label"] for r in model.predict([p.body for p in bodies])]
    return [Payload(p.body, label) for p, label in zip(bodies, labels)]


def target(cfg) -> Target:
    return Target("127.0.0.1", cfg.inference_port, cfg.model, torchserve.keys(cfg.state_dir)["inference"]["key"])


def test_soak_256_clients_4000_digits_every_one_answered_right(hardened, convnet_export):
    cfg, _ = hardened
    level = run_level(target(cfg), expected(convnet_export), 256, 180, 4000)
    print(
        f"\nsoak: 256 clients, {level.requests} requests, {level.throughput:.0f} req/s, "
        f"p50 {level.latency_ms['p50']:.1f} ms, p99 {level.latency_ms['p99']:.1f} ms"
    )
    assert level.requests == 4000 and level.errors == {}  # no 503: the queue holds them all
    assert level.accuracy == 1.0  # every answer is the embedding's answer for that digit
    assert 0 < level.latency_ms["p50"] <= level.latency_ms["p99"] <= level.latency_ms["max"]


def all_ready(cfg) -> list[dict]:
    """The model's workers once every one is READY (after a kill, once TorchServe has replaced it)."""

    def ready() -> list[dict]:
        ws = torchserve.status(cfg.state_dir)["workers"]
        return ws if len(ws) == ModelConfig().minWorkers and all(w["status"] == "READY" for w in ws) else []

    return wait_for(ready, 90, "every TorchServe worker READY")


def test_kill_9_of_a_worker_under_load_costs_only_its_own_requests(hardened, convnet_export):
    cfg, _ = hardened
    workers = all_ready(cfg)
    assert len(workers) >= 2  # the default: a worker's death never leaves the model without one
    level, d = kill_worker_under_load(target(cfg), int(workers[0]["pid"]), expected(convnet_export), 256, 4000)
    print(f"\nkill -9 under load: {d}")
    assert d.requests == 4000 and d.failed_sent_after_kill == 0  # every request sent after the kill is answered
    assert sum(d.failed.values()) <= BATCH  # at most the one batch the dead worker held ...
    assert sum(d.failed.values()) == d.failed_in_flight  # ... all of them requests it held when it died
    # TorchServe's "Worker died." for the batch: 507 once its frontend has reaped the exit code 137, 500 before
    assert set(d.failed) <= {"500", "507"}
    after = all_ready(cfg)
    assert workers[0]["pid"] not in [w["pid"] for w in after]


@pytest.mark.parametrize("name,body,ctype,headers,status,words", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_requests_get_a_clear_json_4xx(hardened, name, body, ctype, headers, status, words):
    cfg, _ = hardened
    got, reply = post(cfg, body, ctype, headers)
    assert got == status and reply["status"] == status and words in reply["error"], (got, reply)
    assert len(reply["error"]) < 600  # what a client sent is never echoed back in full


def test_a_volley_of_pixel_bombs_does_not_hold_the_workers(hardened):
    """16 cheap files that declare 16 megapixels each, sent at once with real digits among them."""
    cfg, _ = hardened
    bomb = encode(Image.new("RGBA", (4000, 3999)))
    bodies = [bomb] * 16 + [png(DIGITS[i]) for i in range(8)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(lambda b: post(cfg, b)[0], bodies))
    assert results == [413] * 16 + [200] * 8


def access_lines(cfg, since: int = 0) -> list[str]:
    log = Path(cfg.state_dir) / "logs" / "access_log.log"
    with open(log, "rb") as f:
        f.seek(since)
        return f.read().decode(errors="replace").splitlines()


def access_mark(cfg) -> int:
    return (Path(cfg.state_dir) / "logs" / "access_log.log").stat().st_size


def test_every_call_leaves_a_bounded_access_record_without_tokens(hardened):
    cfg, _ = hardened
    mark = access_mark(cfg)
    assert post(cfg, DIGIT)[0] == 200
    assert post(cfg, DIGIT, key=False)[0] in (400, 401)  # auth failure
    assert post(cfg, b"GIF89a-not", "image/gif")[0] == 415
    conn = http.client.HTTPConnection("127.0.0.1", cfg.management_port, timeout=10)
    management = torchserve.headers(cfg.state_dir, "management")
    conn.request("GET", f"/models/{cfg.model}?token=secret-in-url", headers=management)
    assert conn.getresponse().status == 200
    conn.close()
    lines = wait_for(
        lambda: (found := access_lines(cfg, mark)) and len(found) >= 4 and found,
        30,
        "four access-log lines (log4j writes asynchronously)",
    )
    assert any('"POST /predictions/mnist-convnet HTTP/1.1" 200' in line for line in lines)
    assert any('"POST /predictions/mnist-convnet HTTP/1.1" 415' in line for line in lines)
    assert any('"GET /models/mnist-convnet?token=*** HTTP/1.1" 200' in line for line in lines)
    assert any(" 400 " in line or " 401 " in line for line in lines)
    every_log = "".join(p.read_text(errors="replace") for p in (Path(cfg.state_dir) / "logs").glob("*.log"))
    for api in ("inference", "management"):
        assert torchserve.keys(cfg.state_dir)[api]["key"] not in every_log
    assert "secret-in-url" not in every_log
    props = (Path(cfg.state_dir) / "config.properties").read_text()
    assert int(props.split("job_queue_size=")[1].split()[0]) >= 256


def test_the_hostile_corpus_gets_no_5xx_and_kills_no_worker(hardened):
    """Every hostile request and a volley of pixel bombs, sent here; the access log holds a 4xx for each."""
    cfg, _ = hardened
    workers = sorted(w["pid"] for w in all_ready(cfg))
    mark = access_mark(cfg)
    bomb = encode(Image.new("RGBA", (4000, 3999)))
    sent = [(body, ctype, headers) for _, body, ctype, headers, _, _ in HOSTILE] + [(bomb, "image/png", {})] * 8
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda s: post(cfg, *s)[0], sent))
    assert all(400 <= s < 500 for s in statuses), statuses
    logged = wait_for(
        lambda: (
            (found := [line for line in access_lines(cfg, mark) if "/predictions/" in line])
            and len(found) >= len(sent)
            and found
        ),
        30,
        f"{len(sent)} access-log lines",
    )
    codes = [line.split('"')[-1].split()[0] for line in logged]
    assert all(c.startswith("4") for c in codes), codes
    assert sorted(w["pid"] for w in torchserve.status(cfg.state_dir)["workers"]) == workers
