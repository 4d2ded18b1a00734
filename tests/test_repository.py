"""Models change in production: two models and two versions of one on one OIP server, driven by tritonclient over
REST and gRPC (repository calls included); a swap under 64 clients that loses nothing; a version that fails its
warm-up or lacks a proof never answers; canary and shadow routes, a corrupted candidate caught in /metrics."""

import asyncio
import json
import shutil
import threading

import numpy as np
import pytest
import torch
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from torchship.export.formats import Options, export_checkpoint
from torchship.export.proof.report import write_report
from torchship.export.proof.verify import verify
from torchship.handlers.model.onnx_model import load as load_onnx
from torchship.handlers.model.responses import probabilities
from torchship.serve import oip
from torchship.serve.client import Connection, Target
from torchship.serve.samples import held_out_digits, png
from torchship.train.fit import train

from helpers import corrupt_onnx, proof_x, quick, scrape, wait_for

DIGITS, _ = held_out_digits()
IMAGES = [png(DIGITS[i]) for i in range(0, 1000, 25)]  # 40 digits of every class
CLIENTS = {"http": thttp, "grpc": tgrpc}


def proven(ckpt, out, name: str, version: str, data_dir):
    """An ONNX export of CKPT as NAME VERSION, with its proof (and the proof's digest of the file) beside it."""
    export_checkpoint(ckpt, out, ("onnx",), name=name, version=version, options=Options(data_dir=data_dir))
    report = verify(out, data_dir=data_dir)
    assert report.passed
    write_report(report, out)
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory, convnet_run, data_dir):
    """digits 1 (the shared ConvNet), digits 2 (the same with its classifier's bias moved: another function), mlp 1;
    a corrupted digits 3 (its largest weight negated: no proof); made once, copied into each test's repository."""
    work = tmp_path_factory.mktemp("versions")
    ckpt = torch.load(convnet_run / "best.pt", weights_only=True)
    generator = torch.Generator().manual_seed(0)
    ckpt["model_state_dict"]["fc2.bias"] += torch.randn(10, generator=generator)
    torch.save(ckpt, work / "moved.pt")
    mlp = tmp_path_factory.mktemp("mlp-run")
    train(quick("mnist-mlp", epochs=1), mlp, data_dir, quiet=True)
    out = {
        "digits/1": proven(convnet_run / "best.pt", work / "digits" / "1", "digits", "1", data_dir),
        "digits/2": proven(work / "moved.pt", work / "digits" / "2", "digits", "2", data_dir),
        "mlp/1": proven(mlp / "best.pt", work / "mlp" / "1", "mlp", "1", data_dir),
    }
    bad = work / "digits" / "3"
    shutil.copytree(out["digits/1"], bad)
    card = json.loads((bad / "meta.json").read_text())
    (bad / "meta.json").write_text(json.dumps({**card, "version": "3"}))
    corrupt_onnx(bad / "model.onnx", proof_x(out["digits/1"], data_dir))
    negate_largest(bad / "model.onnx")
    out["digits/3"] = bad
    return out


def negate_largest(path) -> None:
    import onnx

    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    init.CopyFrom(onnx.numpy_helper.from_array(-onnx.numpy_helper.to_array(init), init.name))
    onnx.save(model, str(path))


def repository(tmp_path, exports, *keys):
    root = tmp_path / "repository"
    for key in keys:
        shutil.copytree(exports[key], root / key)
    return root


def expected(export) -> np.ndarray:
    """What in-process ONNX Runtime answers for IMAGES: probabilities per image."""
    model = load_onnx(export / "model.onnx")
    x = np.stack([model.prepare(b) for b in IMAGES])
    return probabilities(model.card, model.run(x))


@pytest.fixture(scope="module")
def server(tmp_path_factory, exports):
    root = repository(tmp_path_factory.mktemp("repo"), exports, "digits/1", "digits/2", "mlp/1")
    state = tmp_path_factory.mktemp("repo-state")
    cfg = oip.start(
        oip.OIPConfig.on_free_ports(
            str(root), "digits", str(state), workers=2, max_batch=8, max_batch_delay_ms=1, threads=1
        ),
        timeout=180,
    )
    yield cfg, root
    oip.stop(state)


def client(cfg, kind):
    return CLIENTS[kind].InferenceServerClient(f"127.0.0.1:{cfg.http_port if kind == 'http' else cfg.grpc_port}")


def images(kind, blobs):
    inp = CLIENTS[kind].InferInput("images", [len(blobs)], "BYTES")
    inp.set_data_from_numpy(np.array(blobs, dtype=object))
    return inp


def version_of(result, kind) -> str:
    return result.get_response()["model_version"] if kind == "http" else result.get_response().model_version


def auth(cfg) -> dict:
    return {"authorization": f"Bearer {oip.key(cfg.state_dir, 'admin')}"}  # gRPC metadata keys are lower-case


@pytest.mark.parametrize("kind", list(CLIENTS))
def test_two_models_and_two_versions_answer_tritonclient(server, exports, kind):
    cfg, _ = server
    c = client(cfg, kind)
    meta = c.get_model_metadata("digits")
    assert list(meta["versions"] if kind == "http" else meta.versions) == ["1", "2"]
    want = {v: expected(exports[f"digits/{v}"])[:4] for v in ("1", "2")}
    assert np.abs(want["1"] - want["2"]).max() > 1e-3  # the two versions answer differently: the test can tell
    newest = c.infer("digits", [images(kind, IMAGES[:4])])
    assert version_of(newest, kind) == "2" and np.abs(newest.as_numpy("probabilities") - want["2"]).max() < 1e-5
    first = c.infer("digits", [images(kind, IMAGES[:4])], model_version="1")
    assert version_of(first, kind) == "1" and np.abs(first.as_numpy("probabilities") - want["1"]).max() < 1e-5
    other = c.infer("mlp", [images(kind, IMAGES[:4])])
    assert np.abs(other.as_numpy("probabilities") - expected(exports["mlp/1"])[:4]).max() < 1e-5
    with pytest.raises(InferenceServerException):
        c.infer("digits", [images(kind, IMAGES[:1])], model_version="7")


@pytest.mark.parametrize("kind", list(CLIENTS))
def test_repository_calls_need_the_admin_token_and_load_and_unload(server, kind):
    cfg, _ = server
    c = client(cfg, kind)
    with pytest.raises(InferenceServerException) as e:
        c.get_model_repository_index()
    assert "401" in str(e.value) or "UNAUTHENTICATED" in str(e.value.status())
    index = c.get_model_repository_index(headers=auth(cfg))
    rows = index if kind == "http" else [{"name": m.name, "version": m.version, "state": m.state} for m in index.models]
    assert {(r["name"], r["version"], r["state"]) for r in rows} == {
        ("digits", "1", "READY"),
        ("digits", "2", "READY"),
        ("mlp", "1", "READY"),
    }
    c.unload_model("mlp", headers=auth(cfg))
    with pytest.raises(InferenceServerException):
        c.infer("mlp", [images(kind, IMAGES[:1])])
    c.load_model("mlp", headers=auth(cfg))
    assert c.infer("mlp", [images(kind, IMAGES[:1])]).as_numpy("label").shape == (1,)
    config = c.get_model_config("digits")
    if kind == "grpc":
        from google.protobuf import json_format

        config = json_format.MessageToDict(config.config, preserving_proto_field_name=True)
    assert int(config["max_batch_size"]) == 256
    assert [(i["name"], i["optional"]) for i in config["input"]] == [("images", True), ("input", True)]
    # the label is [N] in metadata and answers: Triton says so as dims [1] reshaped to [] (not [N, 1])
    label = next(o for o in config["output"] if o["name"] == "label")
    assert [int(d) for d in label["dims"]] == [1] and "reshape" in label and not label["reshape"].get("shape")
    meta = c.get_model_metadata("digits")
    shapes = (
        {o["name"]: o["shape"] for o in meta["outputs"]}
        if kind == "http"
        else {o.name: list(o.shape) for o in meta.outputs}
    )
    assert [int(d) for d in shapes["label"]] == [-1]


def test_canary_and_a_shadow_of_a_corrupted_candidate(server, exports):
    cfg, root = server
    shutil.copytree(exports["digits/3"], root / "digits" / "3")
    rows = oip.repository_call(cfg.state_dir, "load", "digits")
    assert {r["version"]: r["reason"] for r in rows}["2"] == "default"  # 3 has no proof: never the default
    assert "proof" in {r["version"]: r["reason"] for r in rows}["3"]
    with pytest.raises(oip.ServerError, match="cannot be the canary"):
        oip.repository_call(cfg.state_dir, "route", "digits", {"canary": "3", "canary_percent": 50})
    oip.repository_call(cfg.state_dir, "route", "digits", {"shadow": "3"})
    want = expected(exports["digits/2"])
    c = client(cfg, "http")
    for i in range(0, len(IMAGES), 4):  # clients get the default's answers while the candidate is compared
        result = c.infer("digits", [images("http", IMAGES[i : i + 4])])
        assert version_of(result, "http") == "2"
        assert np.abs(result.as_numpy("probabilities") - want[i : i + 4]).max() < 1e-5
    labels = {"model": "digits", "default": "2", "candidate": "3"}
    compared = wait_for(
        lambda: scrape(cfg.http_port, "torchship_shadow_requests_total", **labels) == 10 and 10,
        60,
        "the shadow's ten comparisons",
    )
    agreed = scrape(cfg.http_port, "torchship_shadow_agreements_total", **labels)
    candidate = expected(exports["digits/3"])
    assert (candidate.argmax(1) != want.argmax(1)).any()  # the corruption shows in the top-1 of these images
    assert agreed < compared
    largest = scrape(cfg.http_port, "torchship_shadow_max_abs_difference", **labels)
    assert largest == pytest.approx(np.abs(candidate - want).max(), abs=1e-4)  # of the probabilities clients get
    assert any(s["candidate"] == "3" and s["agreed"] < s["compared"] for s in oip.status(cfg.state_dir)["shadow"])
    g = client(cfg, "grpc")  # the shadow is the request path's, whichever transport carried the request
    for i in range(0, 20, 4):
        assert version_of(g.infer("digits", [images("grpc", IMAGES[i : i + 4])]), "grpc") == "2"
    wait_for(
        lambda: scrape(cfg.http_port, "torchship_shadow_requests_total", **labels) == compared + 5,
        60,
        "five more comparisons, of gRPC requests",
    )
    oip.repository_call(cfg.state_dir, "route", "digits", {"shadow": None, "canary": "1", "canary_percent": 25})
    versions = [version_of(c.infer("digits", [images("http", IMAGES[:1])]), "http") for _ in range(100)]
    assert versions.count("1") in (24, 25) and set(versions) == {"1", "2"}  # an exact share in each of 2 workers
    oip.repository_call(cfg.state_dir, "route", "digits", {"canary": None})
    oip.repository_call(cfg.state_dir, "unload", "digits", {"parameters": {"version": "3"}})
    shutil.rmtree(root / "digits" / "3")


def test_a_version_that_fails_its_warm_up_never_takes_traffic(server, tmp_path):
    """A model whose batch is fixed at 1 cannot run the warm-up's batch of 8: the load fails, saying so, and the
    default still answers."""
    import onnx
    from onnx import TensorProto, helper

    cfg, root = server
    card = json.loads((root / "digits" / "2" / "meta.json").read_text())
    weights = helper.make_tensor("w", TensorProto.FLOAT, [784, 10], np.random.default_rng(0).normal(size=7840))
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["images"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "fixed",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        [weights],
    )
    broken = root / "digits" / "9"
    broken.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), broken / "model.onnx")
    (broken / "meta.json").write_text(
        json.dumps({**card, "version": "9", "output_kind": "logits", "output_name": "logits"})
    )
    try:
        with pytest.raises(oip.ServerError, match="version 9 never took traffic.*warm-up"):
            oip.repository_call(cfg.state_dir, "load", "digits")
        result = client(cfg, "http").infer("digits", [images("http", IMAGES[:1])])
        assert version_of(result, "http") == "2"
        index = oip.repository_call(cfg.state_dir, "index")
        assert {(r["name"], r["version"]) for r in index} == {("digits", "1"), ("digits", "2"), ("mlp", "1")}
    finally:
        shutil.rmtree(broken)


def test_a_swap_under_64_clients_loses_nothing(tmp_path, exports):
    """64 clients send digits while version 2 is loaded, made the default and version 1 unloaded: every request is
    answered, each by exactly one version, with that version's own answer."""
    root = repository(tmp_path, exports, "digits/1")
    cfg = oip.start(
        oip.OIPConfig.on_free_ports(
            str(root), "digits", str(tmp_path / "state"), workers=2, max_batch=8, max_batch_delay_ms=1, threads=1
        ),
        timeout=180,
    )
    want = {v: expected(exports[f"digits/{v}"]) for v in ("1", "2")}
    answers, done = [], threading.Event()
    target = Target("127.0.0.1", cfg.http_port, "digits", protocol="v2-json")
    try:
        loader = threading.Thread(target=lambda: asyncio.run(clients(target, answers, done)), daemon=True)
        loader.start()
        wait_for(lambda: len(answers) >= 500, 120, "500 answers from version 1 before the swap")
        shutil.copytree(exports["digits/2"], root / "digits" / "2")
        oip.repository_call(cfg.state_dir, "load", "digits")
        oip.repository_call(cfg.state_dir, "unload", "digits", {"parameters": {"version": "1"}})
        swapped = len(answers)
        wait_for(lambda: len(answers) >= swapped + 500, 120, "500 answers after the swap")
        done.set()
        loader.join(60)
    finally:
        oip.stop(tmp_path / "state")
    assert all(status == 200 for _, status, _ in answers), {s for _, s, _ in answers}
    seen = {body["model_version"] for _, _, body in answers}
    assert seen == {"1", "2"}
    for i, _, body in answers:  # each answer is its version's own, never a mix
        probs = np.array(next(o["data"] for o in body["outputs"] if o["name"] == "probabilities"))
        assert np.abs(probs - want[body["model_version"]][i]).max() < 1e-5
    assert answers[-1][2]["model_version"] == "2"


async def clients(target: Target, answers: list, done: threading.Event, n: int = 64) -> None:
    requests = [target.request(b, "image/png") for b in IMAGES]

    async def one(k: int) -> None:
        conn = Connection(target)
        i = k
        while not done.is_set():
            status, reply = await conn.send(requests[i % len(IMAGES)])
            answers.append((i % len(IMAGES), status, json.loads(reply) if status == 200 else reply))
            i += n
        await conn.close()

    await asyncio.gather(*(one(k) for k in range(n)))


def test_the_routes_are_an_exact_share_per_worker():
    """Model.pick: the canary takes exactly its percent of the requests a worker routes, spread evenly."""
    from torchship.handlers.oip.repository import Model, Route

    m = Model("m", {"1": "one", "2": "two"}, Route("1", canary="2", canary_percent=25))
    picks = [m.pick(None)[0] for _ in range(100)]
    assert picks.count("two") == 25 and "two" not in picks[:3] and picks[3] == "two"
    assert m.pick("1") == ("one", None)
