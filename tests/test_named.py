"""Models that take several named tensors, as users bring them: a Hugging Face BERT (ids and mask, dynamic batch and
sequence, built from a small BertConfig with random weights: no download) and a two-input tabular model with
several outputs. Each goes through `torchship export --model --signature`, its proof, a corrupted weight, the OIP
server (tritonclient over HTTP and gRPC), TorchServe's JSON and the embedding."""

import asyncio
import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from named_models import MODELS, NAMED, VOCAB
from tritonclient.utils import InferenceServerException

from torchship.export.user_model import rebuild
from torchship.handlers.card import Architecture, CardError, ModelCard
from torchship.handlers.model import named
from torchship.handlers.model.onnx_model import InputError
from torchship.handlers.model.onnx_model import load as load_onnx
from torchship.handlers.oip.batching import Batcher
from torchship.handlers.oip.served import stacking
from torchship.handlers.signature import Signature, validate_signature
from torchship.serve import oip, torchserve
from torchship.serve.archive import ModelConfig

from helpers import TORCHSHIP, corrupt_onnx, named_proof_feeds, torchserve_of
from helpers import post_json as post


@pytest.fixture(scope="module")
def models(named_exports):
    out = {}
    for name in NAMED:
        folder = named_exports(name)
        card = ModelCard.load(folder / name)
        out[name] = {
            "dir": folder / name,
            "card": card,
            "eager": rebuild(card),
            "stdout": (folder / "stdout.txt").read_text(),
        }
    return out


def eager(model, card: ModelCard, feeds: dict) -> dict:
    with torch.inference_mode():
        ys = model(*(torch.from_numpy(np.asarray(feeds[t.name])) for t in card.signature.inputs))
    return {t.name: y.numpy() for t, y in zip(card.signature.outputs, ys)}


def sentence(length: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, VOCAB, (1, length)), "attention_mask": np.ones((1, length), np.int64)}


def test_the_card_states_every_input_and_output_and_loads_back(models):
    card = models["bert"]["card"]
    assert card.named and [t.name for t in card.signature.inputs] == ["input_ids", "attention_mask"]
    assert card.signature.dims == {"sequence": (1, 128)} and card.signature.inputs[1].mask
    assert ModelCard.from_json(card.to_json()) == card
    with pytest.raises(CardError, match="dimension 'words'"):
        validate_signature(
            Signature(
                inputs=[{"name": "x", "datatype": "INT64", "shape": ["batch", "words"]}],
                outputs=[{"name": "y", "datatype": "FP32", "shape": ["batch", 1]}],
            )
        )


def test_the_proof_covers_three_sequence_lengths_and_padding_on_every_format(models):
    report = json.loads((models["bert"]["dir"] / "equivalence.json").read_text())
    assert report["passed"] and [c["sequence"] for c in report["inputs"]["cases"]] == [1, 7, 128]
    seen = {(c["backend"], str(c["dims"]["sequence"]).split(",")[0]) for c in report["checks"]}
    for backend in ("torchscript", "onnx"):
        assert {(backend, "1"), (backend, "7"), (backend, "128"), (backend, "padded")} <= seen
    assert "all checks pass" in models["bert"]["stdout"]


@pytest.mark.parametrize("name", ["bert", "shop", "detector"])
def test_one_corrupted_weight_fails_the_proof_naming_the_output(models, name, tmp_path):
    copy = tmp_path / name
    shutil.copytree(models[name]["dir"], copy)
    corrupt_onnx(copy / "model.onnx", named_proof_feeds(copy))  # shown there to change the output first
    run = subprocess.run([*TORCHSHIP, "verify", str(copy)], capture_output=True, text=True)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "onnx output '" in run.stderr and "does not match eager PyTorch" in run.stderr, run.stderr


def test_the_embedding_answers_every_output_by_name(models):
    shop = models["shop"]
    model = load_onnx(shop["dir"] / "model.onnx")
    rng = np.random.default_rng(1)
    feeds = {"dense": rng.uniform(-3, 3, (5, 13)).astype(np.float32), "ids": rng.integers(0, 10, (5, 2))}
    got, want = model.predict(feeds), eager(shop["eager"], shop["card"], feeds)
    assert set(got) == {"score", "kind_logits", "high_ids"} and got["high_ids"].dtype == np.int64
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError, match=r"input 'ids' element \[0, 1\]: 10 is outside 0..9"):
        model.predict({"dense": feeds["dense"][:1], "ids": np.array([[3, 10]])})
    det = models["detector"]
    images = np.random.default_rng(7).uniform(0, 1, (2, 3, 64, 64)).astype(np.float32)
    assert top_gap(det["eager"], images) > 1e-4  # no near-tie to rank
    got, want = (
        load_onnx(det["dir"] / "model.onnx").predict({"images": images}),
        eager(det["eager"], det["card"], {"images": images}),
    )
    np.testing.assert_array_equal(got["labels"], want["labels"])
    np.testing.assert_allclose(got["boxes"], want["boxes"], rtol=1e-4, atol=1e-4)
    bert = load_onnx(models["bert"]["dir"] / "model.onnx")
    with pytest.raises(InputError, match="every position is masked out"):
        bert.predict({"input_ids": np.array([[5, 6]]), "attention_mask": np.array([[0, 0]])})


def masked_mean():
    """A model of two padded inputs (floats and their mask) and two outputs (a masked mean, and each element twice):
    its card, a runner, and a request of length N."""
    from torchship.handlers.model import runners

    sig = Signature(
        **{
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": ["batch", "t"], "pad": 0.0},
                {"name": "m", "datatype": "INT64", "shape": ["batch", "t"], "range": [0, 1], "pad": 0, "mask": True},
            ],
            "outputs": [
                {"name": "mean", "datatype": "FP32", "shape": ["batch"]},
                {"name": "each", "datatype": "FP32", "shape": ["batch", "t"]},
            ],
            "dims": {"t": [1, 64]},
        }
    )

    class MaskedMean(torch.nn.Module):
        def forward(self, x, m):
            w = m.float()
            return (x * w).sum(1) / w.sum(1), x * 2

    card = ModelCard(
        name="mm",
        task="tensors",
        input_shape=(),
        mean=(),
        std=(),
        labels=(),
        preprocess="none",
        output_kind="tensors",
        architecture=Architecture("tests:MaskedMean"),
        input_kind="named",
        signature=sig,
    )
    rng = np.random.default_rng(0)

    def request(n: int) -> named.Rows:
        x = rng.standard_normal(n).astype(np.float32)
        return named.check(sig, {"x": ("FP32", (1, n), x), "m": ("INT64", (1, n), np.ones(n, np.int64))})

    return card, runners.named_torch_runner(MaskedMean(), sig), request


def batched(card, run, requests, **settings) -> tuple[list, list]:
    """Every request queued before the batcher's first pass; the passes it made and each request's answer."""
    passes = []

    async def go():
        batcher = Batcher(
            run, max_batch_delay_ms=0, max_queue=8, on_pass=passes.append, stacking=stacking(card), **settings
        )
        futures = [batcher.enqueue(r) for r in requests]
        batcher.start()
        answers = await asyncio.gather(*futures)
        await batcher.stop()
        return answers

    return passes, asyncio.run(go())


def test_a_batch_of_different_lengths_answers_what_each_request_alone_does():
    """The batcher pads three queued requests of lengths 2, 9 and 30 into one pass and cuts each answer back out."""
    card, run, request = masked_mean()
    requests = [request(n) for n in (2, 9, 30)]
    passes, answers = batched(card, run, requests, max_batch=8)
    assert [p.rows for p in passes] == [3]  # one pass held all three
    for r, a in zip(requests, answers):
        alone = run(r.arrays)
        assert a["each"].shape == alone["each"].shape == (1, r.dims["t"])
        np.testing.assert_array_equal(a["each"], alone["each"])
        np.testing.assert_allclose(a["mean"], alone["mean"], rtol=1e-6)


def test_a_token_budget_gathers_requests_of_similar_lengths_and_keeps_long_ones_apart():
    """max_batch_tokens 130: the oldest (60) shares its pass with the closest length (58: 2 x 60 = 120), not with the
    short ones (3 x 60 > 130), which then share one pass (4 x 5); without a budget all six share one, padded to 60."""
    card, run, request = masked_mean()
    requests = [request(n) for n in (60, 2, 3, 58, 4, 5)]
    passes, answers = batched(card, run, requests, max_batch=8, max_batch_tokens=130)
    assert [p.rows for p in passes] == [2, 4]
    for r, a in zip(requests, answers):
        np.testing.assert_allclose(a["mean"], run(r.arrays)["mean"], rtol=1e-6)
        assert a["each"].shape == (1, r.dims["t"])
    passes, _ = batched(card, run, requests, max_batch=8, max_batch_tokens=0)
    assert [p.rows for p in passes] == [6]


@pytest.fixture(scope="module")
def oip_server(tmp_path_factory, models):
    started = {}
    try:
        for name in models:
            cfg = oip.OIPConfig.on_free_ports(
                str(models[name]["dir"]), name, str(tmp_path_factory.mktemp(f"oip-{name}")), workers=1
            )
            started[name] = oip.start(cfg, timeout=180)
        yield started
    finally:
        for cfg in started.values():
            oip.stop(cfg.state_dir)


def client(kind: str, cfg):
    module = thttp if kind == "http" else tgrpc
    return module, module.InferenceServerClient(f"127.0.0.1:{cfg.http_port if kind == 'http' else cfg.grpc_port}")


def infer(kind: str, cfg, model: str, feeds: dict, outputs=None) -> dict:
    module, c = client(kind, cfg)
    inputs = []
    for name, x in feeds.items():
        x = np.asarray(x)
        inp = module.InferInput(name, list(x.shape), {np.dtype(np.int64): "INT64"}.get(x.dtype, "FP32"))
        inp.set_data_from_numpy(x)
        inputs.append(inp)
    wanted = [module.InferRequestedOutput(o) for o in outputs] if outputs else None
    result = c.infer(model, inputs, outputs=wanted)
    names = outputs or [
        o["name"]
        for o in (
            result.get_response()["outputs"]
            if kind == "http"
            else [{"name": o.name} for o in result.get_response().outputs]
        )
    ]
    return {n: result.as_numpy(n) for n in names}


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_tritonclient_gets_the_eager_logits_for_requests_of_different_lengths(oip_server, models, kind):
    bert, cfg = models["bert"], oip_server["bert"]
    _, c = client(kind, cfg)
    meta = c.get_model_metadata("bert")
    inputs = meta["inputs"] if kind == "http" else [{"name": i.name, "shape": list(i.shape)} for i in meta.inputs]
    assert [(i["name"], [int(d) for d in i["shape"]]) for i in inputs] == [
        ("input_ids", [-1, -1]),
        ("attention_mask", [-1, -1]),
    ]
    lengths = [3, 17, 64, 128, 1, 40, 9, 100]
    with ThreadPoolExecutor(8) as pool:  # concurrent: the server may batch them, padded; answers must not change
        got = list(pool.map(lambda k: infer(kind, cfg, "bert", sentence(lengths[k], k)), range(len(lengths))))
    for k, n in enumerate(lengths):
        want = eager(bert["eager"], bert["card"], sentence(n, k))["logits"]
        np.testing.assert_allclose(got[k]["logits"], want, rtol=1e-4, atol=1e-5)
    # one request of two rows the client padded itself, the mask saying where
    a, b = sentence(5, 50), sentence(12, 51)
    ids = np.zeros((2, 12), np.int64)
    ids[0, :5], ids[1] = a["input_ids"][0], b["input_ids"][0]
    mask = (np.arange(12) < np.array([[5], [12]])).astype(np.int64)
    both = infer(kind, cfg, "bert", {"input_ids": ids, "attention_mask": mask})["logits"]
    want = np.concatenate([eager(bert["eager"], bert["card"], s)["logits"] for s in (a, b)])
    np.testing.assert_allclose(both, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_several_outputs_answer_by_name_and_bad_inputs_name_the_input(oip_server, models, kind):
    shop, cfg = models["shop"], oip_server["shop"]
    rng = np.random.default_rng(2)
    feeds = {"dense": rng.uniform(-3, 3, (4, 13)).astype(np.float32), "ids": rng.integers(0, 10, (4, 2))}
    want = eager(shop["eager"], shop["card"], feeds)
    got = infer(kind, cfg, "shop", feeds)
    assert set(got) == {"score", "kind_logits", "high_ids"}
    np.testing.assert_array_equal(got["high_ids"], want["high_ids"])
    for k in ("score", "kind_logits"):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5)
    assert set(infer(kind, cfg, "shop", feeds, outputs=["high_ids"])) == {"high_ids"}
    bad = {
        "wrong name": ({"dense": feeds["dense"], "idz": feeds["ids"]}, "missing ['ids']"),
        "wrong dtype": ({"dense": feeds["dense"], "ids": feeds["ids"].astype(np.float32)}, "'ids' must be INT64"),
        "out of range": (
            {"dense": feeds["dense"], "ids": np.array([[0, 1]] * 3 + [[2, 99]])},
            "input 'ids' element [3, 1]: 99 is outside 0..9",
        ),
    }
    for case, (inputs, message) in bad.items():
        with pytest.raises(InferenceServerException, match=None) as e:
            infer(kind, cfg, "shop", inputs)
        assert message in str(e.value), (case, str(e.value))
        assert kind == "grpc" or "400" in str(e.value.status()), (case, e.value.status())
    long = sentence(129, 0)
    with pytest.raises(InferenceServerException) as e:
        infer(kind, oip_server["bert"], "bert", long)
    assert "sequence 129 is out of 1..128" in str(e.value)


@pytest.fixture(scope="module")
def torchserve_server(tmp_path_factory, models, bare_python):
    """One TorchServe for all three models, under a Python without torchship or transformers: the archives' own
    runtime. BERT batches up to 4 requests within 200 ms: different lengths, padded."""
    config = ModelConfig(minWorkers=1, maxWorkers=1, batchSize=4, maxBatchDelay=200)
    with torchserve_of(tmp_path_factory, {n: m["dir"] for n, m in models.items()}, bare_python, config) as cfg:
        yield cfg


def test_torchserve_takes_named_inputs_as_json_and_batches_different_lengths(torchserve_server, models):
    bert, cfg = models["bert"], torchserve_server
    headers = torchserve.headers(cfg.state_dir)
    lengths = [4, 30, 11, 128]

    def one(k):
        s = sentence(lengths[k], 10 + k)
        body = {"inputs": {n: v[0].tolist() for n, v in s.items()}}
        return post(cfg.inference_port, "/predictions/bert", body, headers)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(one, range(len(lengths))))
    for k, (status, body) in enumerate(answers):
        assert status == 200, body
        want = eager(bert["eager"], bert["card"], sentence(lengths[k], 10 + k))["logits"][0]
        np.testing.assert_allclose(body["outputs"]["logits"], want, rtol=1e-4, atol=1e-5)
    bad = {"inputs": {"input_ids": [1, 2, 5000], "attention_mask": [1, 1, 1]}}
    status, body = post(cfg.inference_port, "/predictions/bert", bad, headers)
    assert status == 400 and "input 'input_ids' element [0, 2]: 5000 is outside 0..999" in body["error"], body


def test_torchserve_answers_several_outputs_by_name(torchserve_server, models):
    cfg, rng = torchserve_server, np.random.default_rng(6)
    headers = torchserve.headers(cfg.state_dir)
    examples = {
        "shop": {"dense": rng.uniform(-3, 3, (1, 13)).astype(np.float32), "ids": rng.integers(0, 10, (1, 2))},
        "detector": {"images": rng.uniform(0, 1, (1, 3, 64, 64)).astype(np.float32)},
    }
    assert top_gap(models["detector"]["eager"], examples["detector"]["images"]) > 1e-4  # no near-tie to rank
    for name, feeds in examples.items():
        status, body = post(
            cfg.inference_port,
            f"/predictions/{name}",
            {"inputs": {k: v[0].tolist() for k, v in feeds.items()}},
            headers,
        )
        assert status == 200, body
        want = eager(models[name]["eager"], models[name]["card"], feeds)
        assert set(body["outputs"]) == set(want)
        for k, y in want.items():
            np.testing.assert_allclose(np.asarray(body["outputs"][k]), y[0], rtol=1e-4, atol=1e-4)


def test_export_refuses_a_signature_that_does_not_fit_the_model(models, tmp_path):
    (tmp_path / "models.py").write_text(MODELS)
    (tmp_path / "sig.json").write_text(
        json.dumps(
            {
                "inputs": [
                    {"name": "dense", "datatype": "FP32", "shape": ["batch", 13]},
                    {"name": "ids", "datatype": "INT64", "shape": ["batch", 2], "range": [0, 9]},
                ],
                "outputs": [{"name": "score", "datatype": "FP32", "shape": ["batch", 2]}],
            }
        )
    )
    shutil.copy(models["shop"]["dir"].parent / "shop.pt", tmp_path / "shop.pt")
    run = subprocess.run(
        [*TORCHSHIP, "export", "--model", "models.py:Shop", "--weights", "shop.pt", "--signature", "sig.json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "output 'score': the model answers FP32 [2, 1] where the signature declares FP32" in run.stderr, run.stderr


def test_the_try_it_sample_serve_start_prints_is_answered(oip_server, models, tmp_path):
    from torchship.serve.samples import write_sample

    sample = write_sample(tmp_path, models["bert"]["card"])
    body = json.loads(sample.v2.read_text())
    status, answer = post(oip_server["bert"].http_port, "/v2/models/bert/infer", body, {})
    assert status == 200 and [o["name"] for o in answer["outputs"]] == ["logits"], answer
    assert json.loads(sample.path.read_text())["inputs"]["attention_mask"] == [1] * 8


def top_gap(detector: torch.nn.Module, images: np.ndarray) -> float:
    """The smallest gap, in any row, between the scores ranked 1..11: how far a ranking is from a tie."""
    with torch.inference_mode():
        best = detector.model.double().cells(torch.from_numpy(images).double())[1]
    detector.model.float()
    ranked = best.topk(detector.model.keep + 1, dim=1).values
    return float((ranked[:, :-1] - ranked[:, 1:]).min())


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_a_detector_answers_boxes_scores_and_labels_by_name(oip_server, models, kind):
    det = models["detector"]
    images = np.random.default_rng(5).uniform(0, 1, (3, 3, 64, 64)).astype(np.float32)
    proof_images = named_proof_feeds(det["dir"])["images"]
    # Labels and boxes follow a ranking: a near-tie could rank differently in float32 and float64. Show there is none
    # here (the proof's inputs and this test's are fixed draws) before holding the answers to the eager model's.
    assert min(top_gap(det["eager"], images), top_gap(det["eager"], proof_images)) > 1e-4
    got, want = (
        infer(kind, oip_server["detector"], "detector", {"images": images}),
        eager(det["eager"], det["card"], {"images": images}),
    )
    assert set(got) == {"boxes", "scores", "labels"} and got["labels"].dtype == np.int64
    np.testing.assert_array_equal(got["labels"], want["labels"])
    np.testing.assert_allclose(got["boxes"], want["boxes"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-4, atol=1e-5)


def test_pt2_takes_named_inputs_and_answers_every_output(models, tmp_path):
    """AOTInductor: the same torch.export program, compiled; its runner returns a list, named here by the signature."""
    shop = models["shop"]
    out, source = tmp_path / "shop-pt2", shop["dir"].parent / "models.py"
    weights = source.parent / "shop.pt"
    run = subprocess.run(
        [
            *TORCHSHIP,
            "export",
            "--model",
            f"{source}:Shop",
            "--weights",
            str(weights),
            "--signature",
            f"{source}:SHOP",
            "--formats",
            "pt2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "equivalence.json").read_text())
    assert report["passed"] and {c["output"] for c in report["checks"] if c["backend"] == "pt2"} == {
        "score",
        "kind_logits",
        "high_ids",
    }
