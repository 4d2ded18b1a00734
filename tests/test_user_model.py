"""Any image classifier: torchvision's MobileNetV3 and a model file the test writes, from weights to a served answer."""

import http.client
import io
import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from torchship.export.proof.verify import verify
from torchship.handlers.card import ModelCard
from torchship.handlers.model.onnx_model import load as load_onnx
from torchship.serve import torchserve
from torchship.serve.archive import ModelConfig, build_archive

from helpers import ROOT, TORCHSHIP, cli_error, corrupt_onnx, proof_x

MODEL_FILE = textwrap.dedent('''
    import torch
    from torch import nn


    class PetNet(nn.Module):
        """BatchNorm, depthwise conv, Dropout and AdaptiveAvgPool on 3 channels: what real classifiers hold."""

        def __init__(self, classes: int = 4, width: int = 16):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, width, 3, padding=1, groups=width), nn.BatchNorm2d(width), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
            )
            self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(width, classes))

        def forward(self, x):
            return self.head(self.features(x))
''')
LABELS = ["red", "green", "blue", "grey"]
COLOURS = np.array([[0.9, 0.15, 0.1], [0.1, 0.8, 0.2], [0.15, 0.2, 0.9], [0.5, 0.5, 0.5]], np.float32)


def colour_images(n: int, seed: int, side: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Pixels in [0, 1] whose dominant colour is the class, under smooth shading: a task PetNet can learn."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    shade = torch.nn.functional.interpolate(
        torch.from_numpy(rng.uniform(0.6, 1.2, (n, 1, 4, 4)).astype(np.float32)), size=(side, side), mode="bilinear"
    )[:, 0].numpy()
    noise = rng.normal(0, 0.05, (n, 3, side, side)).astype(np.float32)
    return np.clip(COLOURS[labels][:, :, None, None] * shade[:, None] + noise, 0, 1), labels


def trained_petnet(petnet):
    """A few hundred Adam steps on colour_images, normalised as the card will say (mean 0.5, std 0.25)."""
    torch.manual_seed(0)
    model = petnet.PetNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = colour_images(2048, seed=1)
    x, y = torch.from_numpy((x - 0.5) / 0.25), torch.from_numpy(y)
    for _ in range(200):
        idx = torch.randint(0, len(x), (32,))
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def settle(model: torch.nn.Module, shape) -> torch.nn.Module:
    """A few forward passes in train mode, so BatchNorm's running statistics are not the identity."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(8, *shape))
    return model.eval()


def run_cli(*args, cwd=ROOT):
    return subprocess.run([*TORCHSHIP, *map(str, args)], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def user_exports(tmp_path_factory):
    """Both models exported through the CLI, as a user would."""
    import sys

    import torchvision

    work = tmp_path_factory.mktemp("user-models")
    (work / "petnet.py").write_text(MODEL_FILE)
    (work / "labels.txt").write_text("\n".join(LABELS) + "\n")
    sys.path.insert(0, str(work))
    try:
        import petnet
    finally:
        sys.path.remove(str(work))
    torch.save(trained_petnet(petnet).state_dict(), work / "petnet.pt")
    calibration = work / "calibration"  # some of its training images, as files, for int8
    calibration.mkdir()
    for i, pixels in enumerate(colour_images(128, seed=1)[0]):
        Image.fromarray((pixels.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(calibration / f"{i}.png")
    mobile = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10)
    torch.save(settle(mobile, (3, 224, 224)).state_dict(), work / "mobilenet.pt")
    runs = {
        "petnet": run_cli(
            "export",
            "--model",
            f"{work / 'petnet.py'}:PetNet",
            "--weights",
            work / "petnet.pt",
            "--input-shape",
            "3,32,32",
            "--labels",
            work / "labels.txt",
            "--preprocess",
            "resize",
            "--mean",
            "0.5",
            "--std",
            "0.25",
            "--formats",
            "ts,onnx,int8",
            "--calibration",
            calibration,
            "--out",
            work / "petnet",
        ),
        "mobilenet": run_cli(
            "export",
            "--model",
            "torchvision.models:mobilenet_v3_small",
            "--model-kwarg",
            "num_classes=10",
            "--weights",
            work / "mobilenet.pt",
            "--input-shape",
            "3,224,224",
            "--mean",
            "0.485,0.456,0.406",
            "--std",
            "0.229,0.224,0.225",
            "--name",
            "mobilenet",
            "--out",
            work / "mobilenet",
        ),
    }
    for name, r in runs.items():
        assert r.returncode == 0, (name, r.stderr[-3000:])
    return work, runs


def photo(seed: int, size=(180, 240)) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).resize(size[::-1], Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG" if seed % 2 else "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("name", ["petnet", "mobilenet"])
def test_export_writes_the_card_and_the_proof_passes(user_exports, name):
    work, runs = user_exports
    out = work / name
    card = ModelCard.load(out)
    assert "all checks pass" in runs[name].stdout
    report = json.loads((out / "equivalence.json").read_text())
    exact = {"eager-fp32", "torchscript", "onnx"}  # the pt2 takes the same path, compiled once in test_formats
    assert report["passed"] and {c["backend"] for c in report["checks"]} == exact
    assert report["inputs"]["real"] == 0 and report["inputs"]["smooth"] > 0  # no dataset: synthetic images
    if name == "petnet":
        assert card.labels == tuple(LABELS) and card.input_shape == (3, 32, 32) and card.preprocess == "resize"
        assert card.architecture.spec.endswith("petnet.py:PetNet") and card.output_kind == "logits"
        (int8,) = report["approximations"]  # the formats of issue 13 work for your own model too
        assert int8["agreement"] >= 0.99 and int8["accuracy"] is None and "128 images from" in int8["calibration"]
    else:
        assert card.name == "mobilenet" and card.preprocess == "resize-crop" and card.resize == 256
        assert card.architecture.kwargs == {"num_classes": 10} and card.labels == tuple(str(i) for i in range(10))
    assert card.provenance.source.endswith(f"{name}.pt") and len(card.provenance.source_sha256) == 64


@pytest.mark.parametrize("name", ["petnet", "mobilenet"])
def test_a_single_corrupted_weight_is_caught(user_exports, name, tmp_path):
    work, _ = user_exports
    copy = tmp_path / name
    shutil.copytree(work / name, copy)
    corrupt_onnx(copy / "model.onnx", proof_x(copy))
    report = verify(copy)
    assert not report.passed and {c.backend for c in report.failures()} == {"onnx"}


@pytest.fixture(scope="module")
def served(user_exports, tmp_path_factory):
    work, _ = user_exports
    store, state = tmp_path_factory.mktemp("store"), tmp_path_factory.mktemp("state")
    for name in ("petnet", "mobilenet"):
        build_archive(work / name, store, config=ModelConfig(minWorkers=1, maxWorkers=1, batchSize=4, maxBatchDelay=5))
    cfg = torchserve.ServerConfig.on_free_ports("petnet", str(store), str(state), extra_models=("mobilenet",))
    try:
        yield torchserve.start(cfg, timeout=240)
    finally:
        java = torchserve.pid(state)
        torchserve.stop(state)
        assert java is None or not psutil.pid_exists(java)


def post(cfg, model: str, body: bytes):
    conn = http.client.HTTPConnection("127.0.0.1", cfg.inference_port, timeout=60)
    conn.request(
        "POST",
        f"/predictions/{model}",
        body,
        {"Content-Type": "application/octet-stream", **torchserve.headers(cfg.state_dir)},
    )
    r = conn.getresponse()
    out = r.status, json.loads(r.read())
    conn.close()
    return out


@pytest.mark.parametrize("name", ["petnet", "mobilenet"])
def test_served_answers_equal_the_embeddings(user_exports, served, name):
    work, _ = user_exports
    model = load_onnx(work / name / "model.onnx")
    for seed in range(6):
        data = photo(seed)
        status, body = post(served, name, data)
        local = model.predict(data)
        assert status == 200 and body["label"] == local["label"], body
        assert abs(body["probability"] - local["probability"]) < 1e-5
        assert [t["label"] for t in body["topk"]] == [t["label"] for t in local["topk"]]


def test_loadtest_sends_your_own_images_and_scores_labelled_ones(user_exports, served, tmp_path):
    work, _ = user_exports
    model = load_onnx(work / "petnet" / "model.onnx")
    images = tmp_path / "images"
    for seed in range(8):  # file each photo under the label the model gives it: every answer must score right
        data = photo(seed)
        folder = images / model.predict(data)["label"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{seed}.{'png' if seed % 2 else 'jpg'}").write_bytes(data)
    r = run_cli(
        "loadtest",
        "--state-dir",
        served.state_dir,
        "--images",
        images,
        "--concurrency",
        "1,2",
        "--requests",
        "16",
        "--duration",
        "20",
        "--out",
        tmp_path / "out",
    )
    assert r.returncode == 0, r.stderr
    levels = json.loads((tmp_path / "out" / "loadtest.json").read_text())["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 2]
    assert all(lv["requests"] == 16 and not lv["errors"] and lv["accuracy"] == 1.0 for lv in levels)


def test_sizing_follows_the_models_measured_cost(user_exports):
    from torchship.handlers.sizing import Cost, cores, measure, sized
    from torchship.serve.archive import model_config

    work, _ = user_exports
    card = ModelCard.load(work / "mobilenet")
    cost = measure(work / "mobilenet", "onnx", card, seconds=0.2)
    assert cost.batch8_ms > cost.batch1_ms > 0
    # the memory a session holds, measured where the server measures it: in a process that has loaded nothing yet
    # (here, one that freed another model could reuse its pages and read less)
    fresh = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from torchship.handlers import sizing; "
            "from torchship.handlers.card import ModelCard; d = Path(sys.argv[1]); "
            "c = sizing.measure(d, 'onnx', ModelCard.load(d), seconds=0.1); print(c.model_bytes, c.session_bytes)",
            str(work / "mobilenet"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    model_bytes, session_bytes = map(int, fresh.stdout.split())
    assert session_bytes >= model_bytes > 1 << 20  # a session holds its weights at least
    tiny, slow = sized(Cost(0.1, 0.4)), sized(Cost(40.0, 320.0))
    assert tiny.max_batch == 8 and tiny.max_batch_delay_ms == 1 and tiny.threads == 1
    assert tiny.pass_slots == tiny.workers  # a fast model's passes never wait for another worker's
    # a heavy one: every core in a lone pass, the cores split between passes at once, batches of up to 8
    # (bench/NOTES.md, levers 59 and 64)
    assert slow.threads == cores() and slow.busy_threads == max(1, cores() // slow.workers)
    assert slow.pass_slots == (cores() // slow.busy_threads if cores() > 1 else slow.workers)
    assert slow.max_batch == 8 and slow.max_batch_delay_ms == 4 and slow.timeout_s >= 30
    # a graph of one image a pass (a detector) gains nothing from a batch but the wait: batches of one
    assert sized(Cost(40.0, 320.0, batches=False)).max_batch == sized(Cost(0.1, 0.4, batches=False)).max_batch == 1
    yaml = model_config(slow).yaml()  # TorchServe's spelling of the same rule: its workers split the cores instead
    assert "batchSize: 8" in yaml and "maxBatchDelay: 4" in yaml
    assert f"threads: {max(1, cores() // slow.workers)}" in yaml


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--model", "torchvision.models:resnet18", "--weights", "{pickled}", "--input-shape", "3,32,32"],
            "pickles Python objects",
        ),
        (["--model", "torchvision.models:resnet18", "--weights", "{petnet}", "--input-shape", "3,32,32"], "keys"),
        (
            ["--model", "{file}:PetNet", "--weights", "{petnet}", "--input-shape", "3,32,32", "--labels", "a,b"],
            "2 labels but the model outputs 4",
        ),
        (["--model", "no.such.module:Net", "--weights", "{petnet}", "--input-shape", "3,32,32"], "cannot import"),
        (["--model", "{file}:Nope", "--weights", "{petnet}", "--input-shape", "3,32,32"], "no attribute"),
        (["--model", "{file}:PetNet", "--weights", "{petnet}", "--input-shape", "3,32"], "C,H,W"),
        (["--model", "{file}:PetNet", "--weights", "{petnet}", "--input-shape", "3,32,32", "--mean", "1,2"], "'mean'"),
        (["--model", "{file}:PetNet", "--weights", "{petnet}", "--input-shape", "1,32,32"], "does not run"),
        (
            ["--model", "{file}:PetNet", "--weights", "{petnet}", "--input-shape", "3,32,32", "--name", "../x"],
            "safe name",
        ),
        (["--model", "{file}:PetNet", "--input-shape", "3,32,32"], "--weights"),
        (["--model", "{file}:PetNet", "--weights", "{petnet}"], "states no working size of its own"),
        (
            ["--model", "{file}:PetNet", "--weights", "{petnet}", "--input-shape", "3,32,32", "--formats", "ts,gif"],
            "choose from",
        ),
    ],
)
def test_what_cannot_be_exported_is_one_clear_line(user_exports, tmp_path, monkeypatch, args, message):
    work, _ = user_exports
    pickled = tmp_path / "whole.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)  # a whole module, not a state dict
    paths = {"pickled": pickled, "petnet": work / "petnet.pt", "file": work / "petnet.py"}
    code, errors, _ = cli_error(monkeypatch, tmp_path, "export", *[a.format(**paths) for a in args], "--out", "out")
    assert code != 0 and len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "out").exists()
