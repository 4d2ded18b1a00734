"""The handler driven by TorchServe's own Context, from an archive unpacked into a bare directory, under a Python
where torchship is not installed: the archive's own files are all the worker has."""

import base64
import io
import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from torchship.export.formats import export_checkpoint
from torchship.serve.archive import ModelConfig, build_archive
from torchship.serve.samples import held_out_digits, png
from torchship.train.fit import train

from helpers import paper, quick

# Runs inside the unpacked archive, whose folder is on sys.path as TorchServe's worker has it.
DRIVER = r"""
import json, sys
from ts.context import Context, RequestProcessor
import torchship_handler
rows, headers = json.load(sys.stdin)
rows = [{k: (bytes.fromhex(v[4:]) if isinstance(v, str) and v.startswith("hex:") else v) for k, v in r.items()}
        for r in rows]
ctx = Context("m", ".", {"model": {}}, len(rows), None, "0.12", model_yaml_config={"handler": {"threads": 1}})
ctx.request_processor = [RequestProcessor(h) for h in headers]
h = torchship_handler.Handler()
h.initialize(ctx)
out = h.handle(rows, ctx)
print(json.dumps({"out": out, "status": [ctx.get_response_status(i)[0] for i in range(len(rows))],
                  "backend": h.backend, "runtime": torchship_handler.ModelHandler.__module__}))
"""


@pytest.fixture(scope="module")
def archives(tmp_path_factory, data_dir, convnet_export, bare_python):
    run = tmp_path_factory.mktemp("run-autoencoder")
    train(quick("mnist-autoencoder", epochs=1), run, data_dir, quiet=True)
    exports = {
        "mnist-convnet": convnet_export,
        "mnist-autoencoder": export_checkpoint(run / "best.pt", tmp_path_factory.mktemp("export")),
    }
    out = {}
    for name, exp in exports.items():
        for backend in ("onnx", "torchscript"):
            store = tmp_path_factory.mktemp(f"store-{backend}")
            mar = build_archive(exp.directory, store, backend=backend, config=ModelConfig(batchSize=8))
            unpacked = tmp_path_factory.mktemp(f"unpacked-{name}-{backend}")
            zipfile.ZipFile(mar).extractall(unpacked)
            out[name, backend] = unpacked
    out["python"] = bare_python
    return out


def handle(archives, key, rows, headers=None):
    directory = archives[key]
    enc = [
        {k: ("hex:" + bytes(v).hex() if isinstance(v, (bytes, bytearray)) else v) for k, v in r.items()} for r in rows
    ]
    payload = json.dumps([enc, headers or [{} for _ in rows]])
    r = subprocess.run([archives["python"], "-c", DRIVER], input=payload, capture_output=True, text=True, cwd=directory)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


DIGITS, LABELS = held_out_digits()


def mixed_batch():
    good = [png(DIGITS[i]) for i in range(4)]
    big = io.BytesIO()
    Image.new("L", (5000, 4000), 255).save(big, format="PNG")
    rows = [
        {"body": good[0]},
        {"body": b""},
        {"file": good[1]},  # multipart form file
        {"body": b"not an image at all"},
        {"body": {"data": base64.b64encode(good[2]).decode()}},  # JSON, parsed by TorchServe
        {"body": {"data": "@@@not base64@@@"}},
        {"body": {"image": "x"}},
        {"body": good[3][:100]},  # truncated PNG
        {"body": big.getvalue()},
    ]
    expected = [200, 400, 200, 415, 200, 400, 400, 400, 413]
    return rows, expected


@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_mixed_batch_good_requests_succeed_bad_get_their_own_4xx(archives, backend):
    rows, expected = mixed_batch()
    res = handle(archives, ("mnist-convnet", backend), rows)
    assert res["backend"] == backend and res["runtime"] == "torchship_handlers.torchserve.handler"
    assert res["status"] == expected
    good = [json.loads(res["out"][i]) for i in (0, 2, 4)]
    assert all(g["label"] in [str(d) for d in range(10)] for g in good)
    for i, code in enumerate(expected):
        body = json.loads(res["out"][i])
        if code == 200:
            assert 0 <= body["probability"] <= 1 and len(body["topk"]) == 3
            assert abs(sum(t["probability"] for t in body["topk"]) - 1) < 0.5
        else:
            assert body["status"] == code and body["error"]


def test_onnx_and_torchscript_archives_answer_alike(archives):
    rows = [{"body": png(DIGITS[i])} for i in range(0, 1000, 50)]
    a = handle(archives, ("mnist-convnet", "onnx"), rows)
    b = handle(archives, ("mnist-convnet", "torchscript"), rows)
    for x, y in zip(a["out"], b["out"]):
        x, y = json.loads(x), json.loads(y)
        assert x["label"] == y["label"] and abs(x["probability"] - y["probability"]) < 1e-4


def test_an_archive_written_before_the_rename_still_loads(archives, tmp_path):
    """Archives made before the runtime shipped as torchship_handlers carry it as torchship_runtime/, with an entry
    module that imports that name: self-contained, they load and answer as they did."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(archives["mnist-convnet", "onnx"], old)
    (old / "torchship_handlers").rename(old / "torchship_runtime")
    entry = old / "torchship_handler.py"
    entry.write_text(entry.read_text().replace("torchship_handlers", "torchship_runtime"))
    rows = [{"body": png(DIGITS[i])} for i in range(4)]
    then, now = handle({**archives, "old": old}, "old", rows), handle(archives, ("mnist-convnet", "onnx"), rows)
    assert then["runtime"] == "torchship_runtime.torchserve.handler" and then["status"] == [200] * 4
    assert then["out"] == now["out"]


def test_topk_from_header_form_field_and_json(archives):
    digit = png(DIGITS[0])
    rows = [
        {"body": digit},
        {"file": digit, "topk": b"5"},
        {"body": {"data": base64.b64encode(digit).decode(), "topk": 1}},
        {"body": digit},
    ]
    headers = [{"X-TopK": "10"}, {}, {}, {"x-topk": "11"}]
    res = handle(archives, ("mnist-convnet", "onnx"), rows, headers)
    assert [len(json.loads(o).get("topk", [])) for o in res["out"][:3]] == [10, 5, 1]
    assert res["status"][3] == 400 and "between 1 and 10" in json.loads(res["out"][3])["error"]


@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_autoencoder_returns_a_png_reconstruction(archives, backend):
    res = handle(archives, ("mnist-autoencoder", backend), [{"body": png(DIGITS[5])}])
    body = json.loads(res["out"][0])
    img = Image.open(io.BytesIO(base64.b64decode(body["image_png_base64"])))
    assert img.size == (28, 28) and img.format == "PNG"
    assert np.asarray(img).std() > 0  # not a blank image


def test_photographed_style_digits_are_classified_as_well_as_mnist_ones(archives):
    """The point of the MNIST-style preprocessing: dark ink on white paper, anywhere, any size, still reads."""
    from torchship.handlers.model.onnx_model import load

    model = load(archives["mnist-convnet", "onnx"] / "model.onnx")
    idx = range(0, 1000, 4)
    raw = np.mean([r["label"] == str(LABELS[i]) for i, r in zip(idx, model.predict([DIGITS[i] for i in idx]))])
    for size, box, top, left in [(60, 40, 10, 5), (400, 300, 50, 90), (90, 28, 0, 62)]:
        pages = [paper(DIGITS[i], size, box, top, left) for i in idx]
        acc = np.mean([r["label"] == str(LABELS[i]) for i, r in zip(idx, model.predict(pages))])
        assert acc >= raw - 0.04, (size, box, acc, raw)


def test_an_archive_is_built_apart_from_any_other_of_the_same_name(convnet_export, tmp_path, monkeypatch):
    """torch-model-archiver stages in $TMPDIR/<model name>, removing what is there: two archives of one name at once
    broke each other. Here the shared temp folder holds a file by that name, which the archiver cannot remove as a
    folder (shown first): the archive is built all the same, and the file is left as it was."""
    shared = tmp_path / "shared-tmp"
    shared.mkdir()
    (shared / "mnist").write_text("another run's")
    monkeypatch.setenv("TMPDIR", str(shared))
    direct = subprocess.run(
        [sys.executable, "-m", "model_archiver.model_packaging", "--model-name", "mnist", "--version", "1",
         "--serialized-file", str(convnet_export.directory / "model.onnx"), "--handler", str(tmp_path / "h.py"),
         "--export-path", str(tmp_path), "--force"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert direct.returncode != 0 and "NotADirectoryError" in direct.stderr, direct.stderr[-2000:]
    mar = build_archive(convnet_export.directory, tmp_path / "store", name="mnist", config=ModelConfig())
    assert "model.onnx" in zipfile.ZipFile(mar).namelist()
    assert (shared / "mnist").read_text() == "another run's" and [p.name for p in shared.iterdir()] == ["mnist"]
