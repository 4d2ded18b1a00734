"""AOTInductor (.pt2) and int8 ONNX: carry the card, are proven, fail when damaged, load without a compiler."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import onnx
import pytest
import torch

from torchship.export.formats import ExportError, Options, export_checkpoint
from torchship.export.inputs import calibration_images, dataset_split
from torchship.export.proof.verify import verify
from torchship.handlers.card import ModelCard

from helpers import ROOT, TORCHSHIP, changes, proof_x, spread


def test_every_format_carries_the_same_card(convnet_all_formats):
    import torch._inductor

    card = convnet_all_formats.card
    assert set(convnet_all_formats.files) == {"ts", "onnx", "pt2", "int8"}
    pt2 = torch._inductor.aoti_load_package(str(convnet_all_formats.files["pt2"]))
    assert ModelCard.from_json(pt2.get_metadata()["torchship"]) == card
    props = {p.key: p.value for p in onnx.load(str(convnet_all_formats.files["int8"])).metadata_props}
    assert ModelCard.from_json(props["torchship"]) == card
    assert "training images" in props["torchship_calibration"]
    ops = {n.op_type for n in onnx.load(str(convnet_all_formats.files["int8"])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format


def test_the_proof_covers_pt2_exactly_and_int8_by_its_answers(convnet_all_formats, data_dir):
    report = verify(convnet_all_formats.directory, data_dir=data_dir)
    assert report.passed
    backends = {c.backend for c in report.checks}
    assert backends == {"eager-fp32", "torchscript", "onnx", "pt2"}
    assert all(c.top1_agreement == 1.0 for c in report.checks if c.backend == "pt2")
    assert report.tolerance_note is None and {c.rtol for c in report.checks} == {1e-4}  # no format needed more
    (int8,) = report.approximations
    assert int8.backend == "onnx-int8" and int8.images == 1000 and "held-out" in int8.inputs
    assert int8.agreement >= 0.99 and int8.accuracy_change_points >= -0.5
    assert int8.max_abs > 0  # reported, not judged: int8 is not bit-exact


def test_int8_calibrates_on_training_images_never_held_out_ones(convnet_export, data_dir):
    card = convnet_export.card
    images, source = calibration_images(card, data_dir)
    assert len(images) == 1024 and "training" in source
    held = dataset_split(card, data_dir, train=False)[0]
    held_out = {hashlib.sha1(np.round(x * 255).astype(np.uint8).tobytes()).digest() for x in held}
    pixels = images * np.float32(card.std[0]) + np.float32(card.mean[0])
    assert not any(hashlib.sha1(np.round(x * 255).astype(np.uint8).tobytes()).digest() in held_out for x in pixels)


def telling_weight(model: torch.nn.Module, name: str, x: np.ndarray) -> int:
    """The first of a spread of NAME's elements whose +0.5 changes the eager model's output on the proof's inputs X:
    the damage the proof must catch (a weight of a unit that never fires on X would rightly pass)."""
    weight = dict(model.named_parameters())[name].view(-1)
    with torch.no_grad():
        base = model(torch.from_numpy(x)).numpy()
        for i in spread(weight.numel()):
            weight[i] += 0.5
            changed = changes(model(torch.from_numpy(x)).numpy(), base)
            weight[i] -= 0.5
            if changed:
                return i
    raise AssertionError(f"no element of {name} tried changes the output on the proof's inputs")


def corrupt_pt2(path, weight: torch.Tensor, index: int) -> None:
    """Change one weight inside the compiled package: AOTInductor keeps them as raw float32 in the .so."""
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i.filename) for i in z.infolist()}
    so = next(n for n in members if n.endswith(".so"))
    original = weight.float().numpy()
    at = members[so].find(original.tobytes()[:256])
    assert at > 0, "weight bytes not found in the package"
    value = np.float32(original.flat[index] + 0.5).tobytes()
    members[so] = members[so][: at + 4 * index] + value + members[so][at + 4 * index + 4 :]
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def test_a_single_corrupted_weight_in_the_pt2_fails_verification(convnet_all_formats, data_dir, tmp_path):
    from torchship.export.user_model import rebuild

    copy = tmp_path / "export"
    shutil.copytree(convnet_all_formats.directory, copy)
    weights = torch.load(convnet_all_formats.card.provenance.source, weights_only=True)["model_state_dict"]
    index = telling_weight(rebuild(convnet_all_formats.card).eval(), "fc1.weight", proof_x(copy, data_dir))
    corrupt_pt2(copy / "model.pt2", weights["fc1.weight"], index)
    r = subprocess.run(
        [*TORCHSHIP, "verify", str(copy), "--data-dir", str(data_dir)], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 1 and "pt2 at batch size" in r.stderr, r.stderr[-2000:]
    failed = {c["backend"] for c in json.loads((copy / "equivalence.json").read_text())["checks"] if not c["passed"]}
    assert failed == {"pt2"}


def test_a_damaged_int8_model_fails_its_section_of_the_proof(convnet_export, data_dir, tmp_path):
    copy = tmp_path / "export"
    shutil.copytree(convnet_export.directory, copy)
    model = onnx.load(str(copy / "model.int8.onnx"))
    scales = [t for t in model.graph.initializer if "scale" in t.name and "conv" in t.name.lower()]
    for t in scales:  # every convolution's weights now dequantize to 3x their value
        w = onnx.numpy_helper.to_array(t).copy() * 3
        t.CopyFrom(onnx.numpy_helper.from_array(w, t.name))
    assert scales
    onnx.save(model, str(copy / "model.int8.onnx"))
    report = verify(copy, data_dir=data_dir)
    assert not report.passed and not report.failures()  # the exact formats still pass
    assert not report.approximations[0].passed


def test_loading_the_pt2_needs_no_compiler(convnet_all_formats, tmp_path):
    code = f"""
import shutil, torch, torch._inductor
assert shutil.which("g++") is None and shutil.which("c++") is None and shutil.which("cc") is None
m = torch._inductor.aoti_load_package({str(convnet_all_formats.files["pt2"])!r})
for n in (1, 5, 300):
    assert m(torch.zeros(n, 1, 28, 28)).shape == (n, 10)
print("ok")
"""
    env = {"PATH": str(tmp_path), "HOME": os.environ.get("HOME", "/root"), "TMPDIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_int8_is_refused_for_a_reconstruction_model(tmp_path, data_dir):
    from torchship.train.fit import train

    from helpers import quick

    train(quick("mnist-autoencoder", epochs=1), tmp_path / "run", data_dir, quiet=True)
    with pytest.raises(ExportError, match="int8 is for classifiers"):
        export_checkpoint(tmp_path / "run" / "best.pt", tmp_path / "export", ("int8",), options=Options(data_dir))
