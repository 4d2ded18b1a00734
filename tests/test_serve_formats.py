"""pt2 and int8 archives behind a real TorchServe: the load test and the hostile corpus pass on both."""

import pytest
from test_hardening import post

from torchship.handlers.model.onnx_model import load as load_onnx
from torchship.serve import torchserve
from torchship.serve.archive import ModelConfig, build_archive
from torchship.serve.loadtest import Payload, Target, payloads, run_level

from hostile import HOSTILE

MODELS = {"mnist-pt2": "pt2", "mnist-int8": "onnx-int8"}


@pytest.fixture(scope="module")
def served(tmp_path_factory, convnet_all_formats, bare_python):
    store, state = tmp_path_factory.mktemp("store"), tmp_path_factory.mktemp("state")
    for name, backend in MODELS.items():
        build_archive(convnet_all_formats.directory, store, name=name, backend=backend, config=ModelConfig())
    names = list(MODELS)
    cfg = torchserve.ServerConfig.on_free_ports(
        names[0], str(store), str(state), extra_models=tuple(names[1:]), python=str(bare_python)
    )
    try:
        yield torchserve.start(cfg, timeout=240)
    finally:
        torchserve.stop(state)
        assert torchserve.pid(state) is None


def local_answers(convnet_all_formats, backend: str) -> list[Payload]:
    """Each digit labelled with what the same format answers in this process: pt2 is exact, so the float ONNX
    embedding speaks for it; int8 answers for itself (its card rides in its metadata too)."""
    path = convnet_all_formats.files["int8" if backend == "onnx-int8" else "onnx"]
    bodies = payloads(n=400)
    labels = [r["label"] for r in load_onnx(path).predict([p.body for p in bodies])]
    return [Payload(p.body, label) for p, label in zip(bodies, labels)]


@pytest.mark.parametrize("name", list(MODELS))
def test_load_test_on_each_format(served, convnet_all_formats, name):
    workers = torchserve.status(served.state_dir)  # the primary model's workers; each format's own are checked below
    assert workers["running"]
    model = torchserve.model_status(served, name)[0]
    assert len(model["workers"]) == 2 and all(w["status"] == "READY" for w in model["workers"])
    target = Target("127.0.0.1", served.inference_port, name, torchserve.keys(served.state_dir)["inference"]["key"])
    for concurrency in (1, 16):
        level = run_level(target, local_answers(convnet_all_formats, MODELS[name]), concurrency, 60, 400)
        assert level.requests == 400 and level.errors == {} and level.accuracy == 1.0


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("case", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_corpus_on_each_format(served, name, case):
    _, body, ctype, headers, status, words = case
    got, reply = post(served, body, ctype, headers, model=name)
    assert got == status and reply["status"] == status and words in reply["error"], (got, reply)
