"""Tensor-input models end to end, on real data sets that ship inside scikit-learn (no download): an iris classifier
and a diabetes regressor, small MLPs trained here and exported with `--model`, and the tutorial's linear regression
preset; proven, served by TorchServe and by the OIP server, and answered by the embedding, all alike."""

import http.client
import json
import shutil
import subprocess
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from torchship.export.proof.verify import verify
from torchship.handlers.model.onnx_model import load as load_onnx
from torchship.serve import oip, torchserve
from torchship.train.fit import train
from torchship.train.presets import get_preset

from helpers import TORCHSHIP, corrupt_onnx, proof_x, torchserve_of

MODEL_FILE = textwrap.dedent('''
    from torch import nn


    class Tabular(nn.Module):
        """Features in, classes or values out."""

        def __init__(self, inputs: int, outputs: int, hidden: int = 16):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, outputs))

        def forward(self, x):
            return self.net(x)
''')
SETS = {"iris": "load_iris", "diabetes": "load_diabetes"}


def fitted(name: str, folder, rows: np.ndarray, targets: np.ndarray) -> dict:
    """A small MLP trained on standardized rows (its card carries the mean and std, so it serves raw rows)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tabular_model", folder / "tabular.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    mean, std = rows.mean(0), rows.std(0)
    x = torch.from_numpy(((rows - mean) / std).astype(np.float32))
    classify = name == "iris"
    torch.manual_seed(0)
    model = module.Tabular(rows.shape[1], 3 if classify else 1)
    y = torch.from_numpy(targets.astype(np.int64 if classify else np.float32))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(400):
        opt.zero_grad()
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out, y) if classify else torch.nn.functional.mse_loss(out[:, 0], y)
        loss.backward()
        opt.step()
    torch.save(model.state_dict(), folder / f"{name}.pt")
    return {"mean": mean, "std": std, "rows": rows}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """iris and diabetes through `torchship export --model`, each with its proof; rows to serve."""
    import sklearn.datasets

    folder = tmp_path_factory.mktemp("tabular")
    (folder / "tabular.py").write_text(MODEL_FILE)
    out = {}
    for name, loader in SETS.items():
        data = getattr(sklearn.datasets, loader)()
        facts = fitted(name, folder, data.data, data.target)
        task = (
            ["--labels", ",".join(data.target_names)]
            if name == "iris"
            else ["--task", "regress", "--output-names", "progression"]
        )
        r = subprocess.run(
            [
                *TORCHSHIP,
                "export",
                "--model",
                str(folder / "tabular.py:Tabular"),
                "--model-kwarg",
                f"inputs={data.data.shape[1]}",
                "--model-kwarg",
                f"outputs={3 if name == 'iris' else 1}",
                "--weights",
                str(folder / f"{name}.pt"),
                "--input-kind",
                "tensor",
                "--input-shape",
                str(data.data.shape[1]),
                "--mean",
                ",".join(map(str, facts["mean"])),
                "--std",
                ",".join(map(str, facts["std"])),
                "--name",
                name,
                "--formats",
                "ts,onnx",
                *task,
                "--out",
                str(folder / name),
            ],
            capture_output=True,
            text=True,
            cwd=folder,
        )
        assert r.returncode == 0 and "all checks pass" in r.stdout, r.stderr[-3000:]
        out[name] = {"dir": folder / name, "rows": data.data, "target": data.target}
    return out


@pytest.fixture(scope="module")
def linreg(tmp_path_factory):
    from torchship.export.formats import export_checkpoint

    run = tmp_path_factory.mktemp("linreg")
    metrics = train(get_preset("linreg"), run / "run", quiet=True)
    export_checkpoint(run / "run" / "best.pt", run / "export", ("ts", "onnx"))
    return {"dir": run / "export", "mse": metrics["test_loss"], "run": run / "run", "metrics": metrics}


TUTORIAL_LOADING = """
checkpoint = torch.load(path)
model.load_state_dict(checkpoint['model_state_dict'])
optimizer.load_state_dict(checkpoint['optimizer_state_dict'])
saved_epoch = checkpoint['epoch']
losses = checkpoint['loss']
val_losses = checkpoint['val_loss']
model.train()
"""


def test_the_tutorials_loading_lines_run_on_our_last_checkpoint(linreg):
    """The tutorial's "Saving (and Loading) Models: taking a break", line for line, on our linreg run's last.pt."""
    from torchship.train.models import LinearRegression

    model = LinearRegression()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scope = {"torch": torch, "model": model, "optimizer": optimizer, "path": str(linreg["run"] / "last.pt")}
    exec(TUTORIAL_LOADING, scope)
    history = json.loads((linreg["run"] / "metrics.json").read_text())["history"]
    assert scope["saved_epoch"] == history[-1]["epoch"] and len(scope["losses"]) == len(history)
    assert scope["losses"] == [h["loss"] for h in history] and scope["val_losses"] == [h["val_loss"] for h in history]
    assert scope["losses"][-1] < scope["losses"][0]  # the line was fitted: the losses fell


def test_a_tensor_models_try_it_row_is_at_its_mean_without_a_recorded_range(tmp_path):
    """Without a recorded range the printed row is the card's mean in raw units, not zeros far outside the data."""
    from torchship.serve.samples import write_sample

    from helpers import card

    wine = card(
        name="wine",
        input_kind="tensor",
        input_shape=(3,),
        mean=(13.0, 2.3, 747.0),
        std=(0.8, 1.1, 315.0),
        preprocess="standardize",
        labels=("a", "b", "c"),
        output_kind="logits",
    )
    sample = write_sample(tmp_path, wine)
    assert json.loads(sample.path.read_text()) == {"instances": [[13.0, 2.3, 747.0]]}


def test_the_cards_say_what_goes_in_and_comes_out(exports):
    iris, diabetes = (load_onnx(exports[n]["dir"] / "model.onnx").card for n in SETS)
    assert (iris.input_kind, iris.input_shape, iris.task, iris.labels) == (
        "tensor",
        (4,),
        "classify",
        ("setosa", "versicolor", "virginica"),
    )
    assert (diabetes.task, diabetes.output_names, diabetes.input_shape) == ("regress", ("progression",), (10,))
    report = json.loads((exports["diabetes"]["dir"] / "equivalence.json").read_text())
    assert report["passed"] and {c["batch_size"] for c in report["checks"]} == {1, 2, 7, 64}


@pytest.mark.parametrize("name", list(SETS))
def test_a_single_corrupted_weight_is_caught(exports, name, tmp_path):
    copy = tmp_path / name
    shutil.copytree(exports[name]["dir"], copy)
    corrupt_onnx(copy / "model.onnx", proof_x(copy))
    assert not verify(copy).passed


def test_the_embedding_takes_rows(exports, linreg):
    iris = load_onnx(exports["iris"]["dir"] / "model.onnx")
    rows = exports["iris"]["rows"]
    answers = iris.predict(rows[::10])
    assert len(answers) == 15 and {a["label"] for a in answers} <= {"setosa", "versicolor", "virginica"}
    assert iris.predict(rows[0]) == answers[0] and iris.predict(rows[::10].tolist()) == answers
    line = load_onnx(linreg["dir"] / "model.onnx")
    assert line.predict(np.array([[0.5]])) == [line.predict(0.5)] and abs(line.predict(0.5) - 2.0) < 0.05
    with pytest.raises(Exception, match="expected shape"):
        iris.predict([[1, 2, 3]])


def post(port: int, path: str, body, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    out = r.status, json.loads(r.read() or b"null")
    conn.close()
    return out


@pytest.fixture(scope="module")
def torchserve_server(tmp_path_factory, exports, linreg, bare_python):
    """One TorchServe (under a Python without torchship) serving all three tensor models."""
    exported = {**{n: exports[n]["dir"] for n in SETS}, "linreg": linreg["dir"]}
    with torchserve_of(tmp_path_factory, exported, bare_python) as cfg:
        yield cfg


@pytest.fixture(scope="module")
def oip_servers(tmp_path_factory, exports, linreg):
    started = {}
    try:
        for name, d in {**{n: exports[n]["dir"] for n in SETS}, "linreg": linreg["dir"]}.items():
            cfg = oip.OIPConfig.on_free_ports(str(d), name, str(tmp_path_factory.mktemp(f"oip-{name}")), workers=1)
            started[name] = oip.start(cfg, timeout=120)
        yield started
    finally:
        for cfg in started.values():
            oip.stop(cfg.state_dir)


def ask(runtime: str, servers, name: str, body) -> tuple[int, dict]:
    """{"instances": [...]} to TorchServe's /predictions or the OIP server's KServe v1 route."""
    if runtime == "torchserve":
        cfg = servers
        return post(cfg.inference_port, f"/predictions/{name}", body, torchserve.headers(cfg.state_dir))
    return post(servers[name].http_port, f"/v1/models/{name}:predict", body)


RUNTIMES = ["torchserve", "oip"]


@pytest.fixture(scope="module")
def servers(torchserve_server, oip_servers):
    return {"torchserve": torchserve_server, "oip": oip_servers}


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("name", [*SETS, "linreg"])
def test_served_answers_equal_the_embeddings(servers, exports, linreg, runtime, name):
    folder = linreg["dir"] if name == "linreg" else exports[name]["dir"]
    rows = np.array([[0.0], [0.5], [1.0]]) if name == "linreg" else exports[name]["rows"][::37]
    status, reply = ask(runtime, servers[runtime], name, {"instances": rows.tolist()})
    assert status == 200, reply
    local = load_onnx(folder / "model.onnx").predict(rows)
    if name == "iris":
        assert [p["label"] for p in reply["predictions"]] == [p["label"] for p in local]
    else:
        assert np.allclose(reply["predictions"], local, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_the_tutorials_line_answers_half_with_two(servers, linreg, runtime):
    """`make train PRESET=linreg export serve`, then curl {"instances": [[0.5]]}: 1 + 2 x 0.5, within the line's
    error."""
    status, reply = ask(runtime, servers[runtime], "linreg", {"instances": [[0.5]]})
    assert status == 200 and abs(reply["predictions"][0] - 2.0) < linreg["mse"] ** 0.5


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_the_printed_curl_line_is_a_request_the_model_takes(servers, linreg, runtime, tmp_path):
    """What `serve start` prints to try a tensor model: one row from the middle of its card's range, as v1 JSON, run
    through curl as a user would paste it; the answer is the embedding's."""
    from dataclasses import replace

    from torchship.serve import runtimes
    from torchship.serve.samples import write_sample

    cfg = replace(servers["torchserve"], model="linreg") if runtime == "torchserve" else servers["oip"]["linreg"]
    card = runtimes.get(runtime).card(cfg)
    assert card is not None and card.name == "linreg" and not card.image
    sample = write_sample(tmp_path, card)
    r = subprocess.run(
        ["bash", "-c", f"{runtimes.get(runtime).curl(cfg, sample)} -sS"], capture_output=True, text=True, timeout=60
    )
    (row,) = json.loads(sample.path.read_text())["instances"]
    assert r.returncode == 0 and 0 < row[0] < 1 and sample.json, r.stderr  # the tutorial's x lie in [0, 1)
    line = load_onnx(linreg["dir"] / "model.onnx")
    assert json.loads(r.stdout)["predictions"][0] == pytest.approx(line.predict(row[0]), abs=1e-5)


BAD_ROWS = [  # (name, body, status, words)
    ("too few features", {"instances": [[5.1, 3.5, 1.4]]}, 400, "expected shape [4]"),
    ("too many features", {"instances": [[5.1, 3.5, 1.4, 0.2, 9.9]]}, 400, "expected shape [4]"),
    ("not a number", {"instances": [[5.1, "wide", 1.4, 0.2]]}, 400, "instances[0][1]"),
    ("a boolean", {"instances": [[5.1, True, 1.4, 0.2]]}, 400, "not a number"),
    ("NaN", b'{"instances": [[5.1, NaN, 1.4, 0.2]]}', 400, ""),
    ("Infinity", b'{"instances": [[5.1, Infinity, 1.4, 0.2]]}', 400, ""),
    ("too many rows", {"instances": [[5.1, 3.5, 1.4, 0.2]] * 257}, 413, "257"),
    ("no instances", {"rows": [[5.1, 3.5, 1.4, 0.2]]}, 400, "instances"),
    ("empty", {"instances": []}, 400, "non-empty"),
    ("second row bad", {"instances": [[5.1, 3.5, 1.4, 0.2], [1, 2]]}, 400, "instances[1]"),
]


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("case", BAD_ROWS, ids=[b[0] for b in BAD_ROWS])
def test_bad_rows_get_a_4xx_naming_what_and_where(servers, runtime, case):
    _, body, status, words = case
    got, reply = ask(runtime, servers[runtime], "iris", body)
    assert got == status and words in reply["error"], (got, reply)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_bad_request_fails_alone_in_a_batch(servers, exports, runtime):
    good = {"instances": exports["iris"]["rows"][:2].tolist()}
    bad = {"instances": [[1.0, "x", 2.0, 3.0]]}
    bodies = [good, bad] * 8
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda b: ask(runtime, servers[runtime], "iris", b)[0], bodies))
    assert results == [200, 400] * 8


def test_tritonclient_over_v2_for_the_regressor(oip_servers, exports):
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp

    rows = exports["diabetes"]["rows"][:5].astype(np.float32)
    local = load_onnx(exports["diabetes"]["dir"] / "model.onnx").predict(rows)
    cfg = oip_servers["diabetes"]
    for module, port in ((thttp, cfg.http_port), (tgrpc, cfg.grpc_port)):
        client = module.InferenceServerClient(f"127.0.0.1:{port}")
        meta = client.get_model_metadata("diabetes")
        inp = module.InferInput("input", list(rows.shape), "FP32")
        inp.set_data_from_numpy(rows)
        out = client.infer("diabetes", [inp]).as_numpy("values")
        assert out.shape == (5, 1) and np.allclose(out[:, 0], local, rtol=1e-5, atol=1e-4)
        assert meta is not None
    bad = thttp.InferInput("input", [1, 9], "FP32")
    bad.set_data_from_numpy(rows[:1, :9])
    with pytest.raises(Exception, match="shape"):
        thttp.InferenceServerClient(f"127.0.0.1:{cfg.http_port}").infer("diabetes", [bad])
