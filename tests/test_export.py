import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from torchship.export.formats import export_checkpoint, sha256
from torchship.export.proof.report import failure_message
from torchship.export.proof.tolerance import compare
from torchship.export.proof.verify import verify
from torchship.handlers.card import ModelCard
from torchship.serve.shipping import copy_runtime
from torchship.train.fit import train
from torchship.train.presets import PRESETS

from helpers import ROOT, TORCHSHIP, changes, corrupt_onnx, no_torch, proof_x, quick, spread


@pytest.fixture(scope="module")
def exports(tmp_path_factory, data_dir):
    """Every preset trained for one epoch and exported."""
    out = {}
    for name, preset in PRESETS.items():
        run = tmp_path_factory.mktemp(f"run-{name}")
        digits = {"dataset": "mnist-5k"} if preset.input_kind == "image" else {}  # fashion too: offline here
        train(quick(name, epochs=1, **digits), run, data_dir, quiet=True)
        out[name] = export_checkpoint(run / "best.pt", tmp_path_factory.mktemp(f"export-{name}"))
    return out


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_exports_and_verifies(name, exports, data_dir):
    exp = exports[name]
    for f in ("model.ts.pt", "model.onnx", "meta.json"):
        assert (exp.directory / f).stat().st_size > 0
    model = onnx.load(str(exp.onnx))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 18
    props = {p.key: p.value for p in model.metadata_props}
    assert ModelCard.from_json(props["torchship"]) == exp.card  # the same card in every place it is written
    assert [i.name for i in model.graph.input] == [exp.card.input_name]
    files = {"meta.json": ""}
    torch.jit.load(str(exp.torchscript), _extra_files=files)
    assert ModelCard.from_json(files["meta.json"]) == exp.card
    card = ModelCard.load(exp.directory)
    assert card == exp.card and card.name == name and card.input_shape == PRESETS[name].input_shape
    p = card.provenance
    assert p.source_sha256 == sha256(Path(p.source)) and p.epoch == 1 and p.created_at
    assert all([p.torch, p.onnx, p.onnxruntime])
    report = verify(exp.directory, data_dir=data_dir)
    assert report.passed, failure_message(report)
    assert {(c.backend, c.batch_size) for c in report.checks} == {
        (b, s) for b in ("eager-fp32", "torchscript", "onnx") for s in (1, 2, 7, 64)
    }
    assert report.inputs["real"] >= (256 if card.image else 20)  # real held-out images, or the tutorial's 20 points
    if card.task == "classify":
        assert all(c.top1_agreement == 1.0 for c in report.checks)


def test_onnx_batch_dimension_is_dynamic(exports):
    import onnxruntime as ort

    exp = exports["mnist-convnet"]
    dim = onnx.load(str(exp.onnx)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param and not dim.dim_value
    session = ort.InferenceSession(str(exp.onnx), providers=["CPUExecutionProvider"])
    for n in (1, 3, 130):
        assert session.run(None, {"images": np.zeros((n, 1, 28, 28), np.float32)})[0].shape == (n, 10)


def test_exported_model_is_in_eval_mode(exports):
    """Dropout is baked out: the same input gives the same output twice, in every backend."""
    exp = exports["mnist-convnet"]
    ts = torch.jit.load(str(exp.torchscript))
    x = torch.randn(8, 1, 28, 28)
    assert torch.equal(ts(x), ts(x))
    assert not ts.training


def corrupt_torchscript(path, x) -> int:
    """corrupt_onnx's damage in the TorchScript file: the first weight shown to change its output on X."""
    files = {"meta.json": ""}
    ts = torch.jit.load(str(path), _extra_files=files)
    weight = max(ts.parameters(), key=lambda p: p.numel()).view(-1)
    with torch.no_grad():
        base = ts(torch.from_numpy(x)).numpy()
        for i in spread(weight.numel()):
            weight[i] += 0.5
            if changes(ts(torch.from_numpy(x)).numpy(), base):
                ts.save(str(path), _extra_files=files)
                return i
            weight[i] -= 0.5
    raise AssertionError(f"no weight tried changes {path}'s output on the proof's inputs")


@pytest.mark.parametrize("backend,corrupt", [("onnx", corrupt_onnx), ("torchscript", corrupt_torchscript)])
def test_a_single_corrupted_weight_fails_verification(backend, corrupt, exports, tmp_path, data_dir):
    import shutil

    exp = exports["mnist-convnet"]
    copy = tmp_path / "export"
    shutil.copytree(exp.directory, copy)
    corrupt(copy / ("model.onnx" if backend == "onnx" else "model.ts.pt"), proof_x(copy, data_dir))
    r = subprocess.run(
        [*TORCHSHIP, "verify", str(copy), "--data-dir", str(data_dir)], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 1
    assert backend in r.stderr and "batch size" in r.stderr and "worst at input" in r.stderr
    assert "FAIL" in r.stdout
    saved = json.loads((copy / "equivalence.json").read_text())
    assert saved["passed"] is False and {c["backend"] for c in saved["checks"] if not c["passed"]} == {backend}


def test_compare_follows_the_both_tolerances_rule():
    ref = np.array([[100.0, 1e-3, 0.0]])
    ok = compare(ref + np.array([[5e-3, 5e-6, 9e-6]]), ref, atol=1e-5, rtol=1e-4)  # within rtol, atol, atol
    assert ok["failures"] == 0
    bad = compare(ref + np.array([[2e-2, 0, 0]]), ref, atol=1e-5, rtol=1e-4)  # exceeds both
    assert bad["failures"] == 1 and bad["worst"]["index"] == [0, 0]
    assert bad["min_atol"] == pytest.approx(2e-2 - 1e-2)
    nan = compare(np.array([[np.nan, 0, 0]]), np.zeros((1, 3)), atol=1, rtol=1)
    assert nan["failures"] == 1 and nan["nan"] == 1


def test_verify_refuses_an_export_whose_checkpoint_changed(exports, tmp_path, data_dir):
    import shutil

    exp = exports["mnist-mlp50"]
    ckpt = tmp_path / "best.pt"
    shutil.copy(exp.card.provenance.source, ckpt)
    with open(ckpt, "ab") as f:
        f.write(b"\0")
    r = subprocess.run(
        [*TORCHSHIP, "verify", str(exp.directory), "--checkpoint", str(ckpt)], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 1 and "changed since this export" in r.stderr


def test_onnx_embedding_needs_the_runtime_folder_and_no_torch(exports, data_dir, bare_python, tmp_path):
    """An app with a copy of the runtime folder, onnxruntime, numpy and Pillow (no torchship installed, `import torch`
    and `import tokenizers` failing: an image model needs neither): load, predict every held-out digit, and agree
    with eager PyTorch."""
    exp = exports["mnist-convnet"]
    app = tmp_path / "app"
    copy_runtime(app)
    code = f"""
import json, sys
import numpy as np
try:
    import torch
except ImportError:
    torch = None
try:
    import tokenizers
except ImportError:
    tokenizers = None
from torchship_handlers.model.onnx_model import load
model = load({str(exp.onnx)!r})
raw = {str(data_dir / "mnist-5k" / "MNIST" / "raw")!r}
images = np.fromfile(raw + "/t10k-images-idx3-ubyte", np.uint8, offset=16).reshape(-1, 28, 28)
labels = [r["label"] for r in model.predict(list(images))]
one = model.predict(images[0])
assert one["label"] == labels[0] and len(one["topk"]) == 3
assert model.predict([]) == []  # a list in, a list out: no images, no forward pass
print(json.dumps({{"labels": labels, "torch": torch is not None, "tokenizers": tokenizers is not None}}))
"""
    blocker = no_torch(tmp_path / "blocker", without=("torch", "tokenizers"))
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{app}"}
    r = subprocess.run([bare_python, "-c", code], capture_output=True, text=True, cwd=app, env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["torch"] is False and out["tokenizers"] is False
    from torchship.train.checkpoint import load as load_checkpoint

    ckpt = load_checkpoint(exp.card.provenance.source)
    from torchship.train.checkpoint import model_from_checkpoint
    from torchship.train.data import load as load_data
    from torchship.train.data import to_tensor

    model = model_from_checkpoint(ckpt)
    _, test = load_data("mnist-5k", data_dir)
    with torch.no_grad():
        eager = model(to_tensor(test.images, exp.card.mean[0], exp.card.std[0], torch.device("cpu"))).argmax(1)
    assert out["labels"] == [str(i) for i in eager.tolist()]


def test_relative_error_is_reported_only_where_rtol_decides():
    """Near-zero reference values made every row read 'max rel 1.00e+00 ... PASS'; they are atol's business."""
    ref = np.array([[5.0, 1e-9, -3.0, 0.0]])
    got = ref + np.array([[2e-6, 1e-7, -1e-6, 1e-7]])
    stats = compare(got, ref, atol=1e-5, rtol=1e-4)
    assert stats["failures"] == 0
    assert stats["max_rel"] == pytest.approx(2e-6 / 5.0)  # not 100.0 from the 1e-9 element
    tiny = compare(np.full((1, 3), 1e-7), np.zeros((1, 3)), atol=1e-5, rtol=1e-4)
    assert tiny["max_rel"] is None and tiny["failures"] == 0
