"""Text in, answers out (`torchship export --tokenizer`): the three text models of tests/text_models.py served by the
OIP server (v2 BYTES over REST and gRPC with tritonclient, OpenAI's embeddings call with the openai client), by
TorchServe (text/plain, as its text_classifier takes it) and embedded without torch; each answer held to a reference
built without torchship's text code: transformers' tokenizer on the text alone and the eager PyTorch model."""

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from torchship.serve import oip, torchserve
from torchship.serve.shipping import copy_runtime

from helpers import TORCHSHIP, no_torch, oip_of, torchserve_of

CLIENTS = {"http": thttp, "grpc": tgrpc}
TEXTS = [
    "torchship exports the model and serves it",
    "Caf\u00e9 in T\u014dky\u014d \u2014 \U0001f642",
    "short",
    "the server batches requests of different lengths " * 6,
]


@pytest.fixture(scope="module")
def eager(text_exports):
    """name -> the eager model and transformers' tokenizer, rebuilt from the files the export was made from."""
    from text_models import TEXT
    from transformers import PreTrainedTokenizerFast

    folder = next(iter(text_exports.values())).parent
    namespace: dict = {}
    exec(compile((folder / "models.py").read_text(), str(folder / "models.py"), "exec"), namespace)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    out = {}
    for name, (factory, _, _) in TEXT.items():
        model = namespace[factory]()
        model.load_state_dict(torch.load(folder / f"{name}.pt"))
        out[name] = model.eval()
    return out, tokenizer


def reference(eager, name: str, text: str) -> dict:
    """The answer for one text alone: transformers' tokens, the eager model, the task's arithmetic here."""
    models, tokenizer = eager
    enc = tokenizer(
        text,
        truncation=True,
        max_length=128,
        return_tensors="pt",
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    with torch.no_grad():
        out = models[name](input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    if name == "sentiment":
        p = torch.softmax(out.logits.double(), -1)[0].numpy()
        return {"probabilities": p, "label": ["negative", "neutral", "positive"][int(p.argmax())]}
    if name == "sentences":
        v = out.last_hidden_state.double()[0].mean(0).numpy()
        return {"embedding": v / np.linalg.norm(v)}
    p = torch.softmax(out.logits.double(), -1)[0].numpy()
    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    special, offsets = enc["special_tokens_mask"][0].tolist(), enc["offset_mapping"][0].tolist()
    return {
        "entities": [
            (labels[int(p[j].argmax())], j, *offsets[j], float(p[j].max()))
            for j in range(len(special))
            if not special[j] and labels[int(p[j].argmax())] != "O"
        ],
        "probabilities": p,
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory, text_exports):
    with oip_of(tmp_path_factory, list(text_exports.values()), max_batch=16, max_batch_delay_ms=20) as cfg:
        yield cfg


def client(cfg, kind):
    return CLIENTS[kind].InferenceServerClient(f"127.0.0.1:{cfg.http_port if kind == 'http' else cfg.grpc_port}")


def infer(c, kind: str, model: str, texts: list, binary: bool = True):
    x = CLIENTS[kind].InferInput("text", [len(texts)], "BYTES")
    data = np.array([t.encode() if isinstance(t, str) else t for t in texts], dtype=object)
    x.set_data_from_numpy(data, **({"binary_data": binary} if kind == "http" else {}))
    return c.infer(model, [x])


@pytest.mark.parametrize("kind", list(CLIENTS))
def test_pairs_of_texts_go_through_the_tokenizers_pair_template(server, eager, kind):
    """nli (--text-pairs): `text` and `text_pair`, [CLS] a [SEP] b [SEP] with token type ids 0 then 1, as
    transformers' tokenizer makes them for the eager model."""
    models, tokenizer = eager
    firsts, seconds = [TEXTS[0], TEXTS[2], TEXTS[3]], [TEXTS[1], TEXTS[0], TEXTS[3]]
    inputs = []
    for name, values in (("text", firsts), ("text_pair", seconds)):
        x = CLIENTS[kind].InferInput(name, [len(values)], "BYTES")
        x.set_data_from_numpy(np.array([v.encode() for v in values], dtype=object))
        inputs.append(x)
    got = client(server, kind).infer("nli", inputs)
    for i, (a, b) in enumerate(zip(firsts, seconds)):
        enc = tokenizer(a, b, truncation=True, max_length=128, return_tensors="pt", return_token_type_ids=True)
        assert enc["token_type_ids"].max() == 1  # the second text is told apart: what the comparison relies on
        with torch.no_grad():
            p = torch.softmax(models["nli"](**enc).logits.double(), -1)[0].numpy()
        assert_far_from_ties(p)
        np.testing.assert_allclose(got.as_numpy("probabilities")[i], p, atol=1e-5)
        assert got.as_numpy("label")[i].decode() == ["entailment", "neutral", "contradiction"][int(p.argmax())]


def assert_far_from_ties(p: np.ndarray) -> None:
    """What an exact label comparison relies on: the best class clear of the second (the heads were scaled)."""
    top = np.sort(p, axis=-1)
    assert (top[..., -1] - top[..., -2] > 1e-3).all(), top


@pytest.mark.parametrize("kind", list(CLIENTS))
def test_each_task_answers_text_as_transformers_and_the_eager_model_do(server, eager, kind):
    c = client(server, kind)
    meta = c.get_model_metadata("sentiment", as_json=True) if kind == "grpc" else c.get_model_metadata("sentiment")
    assert [(t["name"], t["datatype"]) for t in meta["inputs"]] == [("text", "BYTES")]
    assert [t["name"] for t in meta["outputs"]] == ["probabilities", "label"]
    got = infer(c, kind, "sentiment", TEXTS)
    probs, labels = got.as_numpy("probabilities"), got.as_numpy("label")
    for i, text in enumerate(TEXTS):
        want = reference(eager, "sentiment", text)
        assert_far_from_ties(want["probabilities"])
        np.testing.assert_allclose(probs[i], want["probabilities"], atol=1e-5)
        assert labels[i].decode() == want["label"]
    vectors = infer(c, kind, "sentences", TEXTS).as_numpy("embedding")
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(vectors[i], reference(eager, "sentences", text)["embedding"], atol=1e-5)
    rows = infer(c, kind, "entities", TEXTS).as_numpy("entities")
    found_any = False
    for i, text in enumerate(TEXTS):
        want = reference(eager, "entities", text)
        assert_far_from_ties(want["probabilities"])
        got = [(e["entity"], e["index"], e["start"], e["end"], e["score"]) for e in json.loads(rows[i])]
        assert [g[:4] for g in got] == [w[:4] for w in want["entities"]]
        np.testing.assert_allclose([g[4] for g in got], [w[4] for w in want["entities"]], atol=1e-5)
        assert all(text[s:e] for _, _, s, e, _ in got)  # offsets into the text itself
        found_any |= bool(got)
    assert found_any  # the tagger labels some tokens: the comparison above compared something


@pytest.mark.parametrize("model", ["sentiment", "entities", "sentences"])
def test_sixteen_concurrent_texts_of_mixed_lengths_each_answer_as_alone(server, model):
    """The batcher pads requests of different token counts into shared passes and cuts each answer back: every one
    equals the same text sent alone (entities: the same tokens, scores within 1e-5). Whether concurrent requests
    meet in a pass is up to the machine's timing: bursts are sent until the statistics show one that did (at most
    eight), and one request of all sixteen texts, padded together for certain, is held to the same rule."""
    texts = [("word " * (1 + 7 * k)).strip() for k in range(16)]

    def one(t):
        result = client(server, "http").infer(model, _text(t))
        return {o["name"]: result.as_numpy(o["name"])[0] for o in result.get_response()["outputs"]}

    alone = [one(t) for t in texts]
    shared = False
    for _ in range(8):
        before = _passes(server, model)
        with ThreadPoolExecutor(16) as pool:
            same_as_alone(alone, list(pool.map(one, texts)))
        passes, requests = (after - b for after, b in zip(_passes(server, model), before))
        assert requests == 16, requests
        if passes < requests:
            shared = True
            break
    assert shared, "no burst of sixteen concurrent requests shared a pass"
    result = client(server, "http").infer(model, _text(*texts))
    names = [o["name"] for o in result.get_response()["outputs"]]
    same_as_alone(alone, [{n: result.as_numpy(n)[i] for n in names} for i in range(len(texts))])


def same_as_alone(alone: list[dict], together: list[dict]) -> None:
    for a, b in zip(alone, together):
        assert a.keys() == b.keys()
        for name in a:
            if name == "entities":
                x, y = json.loads(a[name]), json.loads(b[name])
                assert [{k: v for k, v in e.items() if k != "score"} for e in x] == [
                    {k: v for k, v in e.items() if k != "score"} for e in y
                ]
                np.testing.assert_allclose([e["score"] for e in x], [e["score"] for e in y], atol=1e-5)
            elif isinstance(a[name], bytes):  # a label
                assert a[name] == b[name]
            else:
                np.testing.assert_allclose(b[name], a[name], atol=1e-5)


def _text(*texts: str) -> list:
    x = thttp.InferInput("text", [len(texts)], "BYTES")
    x.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
    return [x]


def _passes(server, model: str) -> tuple[int, int]:
    stats = client(server, "http").get_inference_statistics(model)["model_stats"][0]
    return stats["execution_count"], stats["inference_stats"]["success"]["count"]


def test_openai_embeddings_through_the_openai_client(server, eager):
    """POST /v1/embeddings as apps make it: the openai client's default (base64) and floats, one text or a list;
    a model that answers no embeddings is refused in OpenAI's error shape."""
    import openai

    c = openai.OpenAI(base_url=f"{server.inference_url}/v1", api_key="none")
    r = c.embeddings.create(model="sentences", input=TEXTS[:2])
    assert [d.index for d in r.data] == [0, 1] and r.model == "sentences" and r.usage.prompt_tokens > 2
    for d, text in zip(r.data, TEXTS):
        np.testing.assert_allclose(d.embedding, reference(eager, "sentences", text)["embedding"], atol=1e-5)
    one = c.embeddings.create(model="sentences", input=TEXTS[2], encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, reference(eager, "sentences", TEXTS[2])["embedding"], atol=1e-5)
    with pytest.raises(openai.BadRequestError) as e:
        c.embeddings.create(model="sentiment", input="x")
    assert "sentiment answers no embeddings" in str(e.value)
    with pytest.raises(openai.NotFoundError) as e:
        c.embeddings.create(model="nothing", input="x")
    with pytest.raises(openai.BadRequestError) as e:
        c.embeddings.create(model="sentences", input=[])
    assert "non-empty list" in str(e.value)


@pytest.mark.parametrize("kind", list(CLIENTS))
def test_bad_text_is_a_4xx_naming_the_input_and_the_row(server, kind):
    c = client(server, kind)
    cases = [
        (["fine", b"\xff\xfe"], "input 'text' row 1: not UTF-8"),
        (["fine", "x" * 70000], "input 'text' row 1: 70000 bytes, more than the 65536"),
    ]
    for texts, message in cases:
        with pytest.raises(InferenceServerException) as e:
            infer(c, kind, "sentiment", texts)
        assert message in e.value.message(), e.value.message()
    empty = CLIENTS[kind].InferInput("text", [0], "BYTES")
    empty.set_data_from_numpy(np.array([], dtype=object))
    with pytest.raises(InferenceServerException) as e:
        c.infer("sentiment", [empty])
    assert "input 'text': batch size 0" in e.value.message()
    if kind == "http":  # JSON can carry a number where a string belongs
        import urllib.request

        body = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a", 7]}]})
        req = urllib.request.Request(f"{server.inference_url}/v2/models/sentiment/infer", body.encode(), method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 400 and "element 1" in json.loads(e.value.read())["error"]


def test_torchserve_takes_plain_text_and_json(tmp_path_factory, text_exports, eager, bare_python):
    """TorchServe's text_classifier way (the body is the text) and our JSON of one example, from the archives, under
    a Python without torchship: every task, and a pair as JSON."""
    import http.client

    models, tokenizer = eager

    def post(model: str, body: bytes, kind: str) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", cfg.inference_port, timeout=60)
        conn.request("POST", f"/predictions/{model}", body, {"Content-Type": kind, **headers})
        r = conn.getresponse()
        answer = json.loads(r.read())
        conn.close()
        assert r.status == 200, answer
        return answer["outputs"]

    with torchserve_of(tmp_path_factory, text_exports, bare_python) as cfg:
        headers = torchserve.headers(cfg.state_dir)
        want = reference(eager, "sentiment", TEXTS[1])
        for body, kind in (
            (TEXTS[1].encode(), "text/plain; charset=utf-8"),
            (json.dumps({"inputs": {"text": TEXTS[1]}}).encode(), "application/json"),
        ):
            got = post("sentiment", body, kind)
            assert got["label"] == want["label"]
            np.testing.assert_allclose(got["probabilities"], want["probabilities"], atol=1e-5)
        got = post("sentences", TEXTS[0].encode(), "text/plain")
        np.testing.assert_allclose(got["embedding"], reference(eager, "sentences", TEXTS[0])["embedding"], atol=1e-5)
        found = json.loads(post("entities", TEXTS[1].encode(), "text/plain")["entities"])
        assert [(e["entity"], e["index"], e["start"], e["end"]) for e in found] == [
            w[:4] for w in reference(eager, "entities", TEXTS[1])["entities"]
        ]
        got = post(
            "nli", json.dumps({"inputs": {"text": TEXTS[0], "text_pair": TEXTS[1]}}).encode(), "application/json"
        )
        enc = tokenizer(TEXTS[0], TEXTS[1], return_tensors="pt", return_token_type_ids=True)
        with torch.no_grad():
            p = torch.softmax(models["nli"](**enc).logits.double(), -1)[0].numpy()
        np.testing.assert_allclose(got["probabilities"], p, atol=1e-5)


def test_an_app_without_torch_embeds_the_text_models(text_exports, eager, bare_python, tmp_path):
    app = tmp_path / "app"
    copy_runtime(app)
    code = f"""
import json
from torchship_handlers.model.onnx_model import load
s = load({str(text_exports["sentiment"] / "model.onnx")!r}).predict({TEXTS[0]!r})
e = load({str(text_exports["sentences"] / "model.onnx")!r}).predict({TEXTS[:2]!r})
t = load({str(text_exports["entities"] / "model.onnx")!r}).predict({TEXTS[1]!r})
print(json.dumps({{"label": s["label"].decode(), "p": s["probabilities"].tolist(), "e": e["embedding"].tolist(),
                  "t": json.loads(t["entities"])}}))
"""
    env = {**os.environ, "PYTHONPATH": f"{no_torch(tmp_path / 'blocker')}{os.pathsep}{app}"}
    r = subprocess.run([bare_python, "-c", code], capture_output=True, text=True, cwd=app, env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    want = reference(eager, "sentiment", TEXTS[0])
    assert out["label"] == want["label"]
    np.testing.assert_allclose(out["p"], want["probabilities"], atol=1e-5)
    for v, text in zip(out["e"], TEXTS[:2]):
        np.testing.assert_allclose(v, reference(eager, "sentences", text)["embedding"], atol=1e-5)
    want = reference(eager, "entities", TEXTS[1])["entities"]
    assert want and [(e["entity"], e["index"], e["start"], e["end"]) for e in out["t"]] == [w[:4] for w in want]


def int8_proof(export) -> dict:
    report = json.loads((export / "equivalence.json").read_text())
    return next(a for a in report["approximations"] if a["backend"] == "onnx-int8")


def test_int8_of_a_text_classifier_is_proven_by_agreement_and_served(text_exports, eager, tmp_path):
    """ONNX Runtime's dynamic quantization: judged by top-1 agreement with eager float32 on a fixed, drawn set; served
    by the OIP server as its own backend, answering each text's label as eager does where the label's margin is wider
    than the largest logit difference the proof saw."""
    export = text_exports["sentiment"]
    a = int8_proof(export)
    assert a["passed"] and a["agreement"] >= 0.99 and a["images"] >= 100 and a["calibration"].startswith("dynamic")
    cfg = oip.start(
        oip.OIPConfig.on_free_ports(
            str(export), "sentiment", str(tmp_path / "state"), backend="onnx-int8", workers=1, max_batch=4, threads=1
        ),
        timeout=180,
    )
    try:
        c = client(cfg, "http")
        assert c.get_model_metadata("sentiment")["platform"] == "onnxruntime_onnx"
        answer = infer(c, "http", "sentiment", TEXTS)
        models, tokenizer = eager
        for text, label in zip(TEXTS, answer.as_numpy("label")):
            enc = tokenizer(text, truncation=True, max_length=128, return_tensors="pt")
            with torch.no_grad():
                logits = models["sentiment"](**enc).logits[0].double().numpy()
            top2 = np.sort(logits)[-2:]
            assert top2[1] - top2[0] > 2 * a["max_abs"]  # wide enough that int8's error cannot flip it
            assert label.decode() == reference(eager, "sentiment", text)["label"]
    finally:
        oip.stop(tmp_path / "state")


def test_a_corrupted_int8_classifier_fails_its_agreement(text_exports, tmp_path):
    """The last quantized layer's weights negated (the damage shown first to change answers): verify fails, naming
    int8."""
    import shutil

    import onnx
    import onnxruntime as ort

    from torchship.export.inputs import draw, example_dims
    from torchship.handlers.card import ModelCard

    copy = tmp_path / "sentiment"
    shutil.copytree(text_exports["sentiment"], copy)
    path = copy / "model.int8.onnx"
    model = onnx.load(str(path))
    last = [n for n in model.graph.node if n.op_type == "MatMulInteger"][-1]  # the quantized layer nearest the output
    head = next(i for i in model.graph.initializer if i.name == last.input[1])
    w = onnx.numpy_helper.to_array(head)
    head.CopyFrom(onnx.numpy_helper.from_array((-w.astype(np.int16)).clip(-127, 127).astype(np.int8), head.name))
    sig = ModelCard.load(copy).signature
    feeds = draw(sig, 32, example_dims(sig), seed=1000)

    def labels(m) -> np.ndarray:
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(["logits"], feeds)[0].argmax(1)

    before = labels(onnx.load(str(path)))
    assert (labels(model) != before).mean() > 0.1  # the damage changes answers
    onnx.save(model, str(path))
    r = subprocess.run([*TORCHSHIP, "verify", str(copy)], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "onnx-int8" in r.stderr + r.stdout and "agreement" in r.stderr + r.stdout, r.stderr


def test_the_load_clients_text_protocol_is_answered_as_tritonclient_is(server):
    """serve/client.py's `v2-text` (what the bench sends a text model, and every peer the same body): one text as v2
    JSON's `text` input, its label read back by the load client as tritonclient reads it."""
    import asyncio

    from torchship.serve.client import Connection, Target, answer

    text = "the load client sends this text"
    want = infer(client(server, "http"), "http", "sentiment", [text]).as_numpy("label")[0].decode()
    target = Target("127.0.0.1", server.http_port, "sentiment", protocol="v2-text")

    async def once():
        conn = Connection(target)
        try:
            return await conn.send(target.request(text.encode(), "text/plain"))
        finally:
            await conn.close()

    status, reply = asyncio.run(once())
    assert status == 200 and answer(reply) == want, reply[:300]
