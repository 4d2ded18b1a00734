"""torchvision's other detector classes (issue 35): RetinaNet, FCOS and SSDlite, each on the tests' small backbone
and trained for seconds, export with their thresholds and pass the detector's proof in TorchScript and ONNX; a Mask
R-CNN exports its boxes and says that its masks are left out."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from torchship.handlers.card import ModelCard

from helpers import ROOT, in_one_process

FAMILY_FILE = ROOT / "tests" / "vision_models.py"


@pytest.fixture(scope="module")
def families(tmp_path_factory, vision_exports):
    """name -> its export folder: the four trained in one process, exported in another, the log beside them."""
    from vision_models import FAMILIES, LABELS, SIZE

    out = tmp_path_factory.mktemp("families")
    trained = subprocess.run(
        [sys.executable, str(FAMILY_FILE), str(out), str(vision_exports["detector"].parent / "detector.pt")],
        capture_output=True,
        text=True,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    names = (*FAMILIES, "mask_rcnn")
    shape = {name: ["--input-shape", f"3,{SIZE},{SIZE}"] for name in names if name != "fcos"}  # FCOS: its own size
    commands = [
        ["export", "--model", f"{FAMILY_FILE}:{name}", "--weights", str(out / f"{name}.pt"), "--labels",
         ",".join(LABELS), "--out", str(out / name), *shape.get(name, [])]
        for name in names
    ]  # fmt: skip
    run = in_one_process(commands, out)
    (out / "exports.log").write_text(f"{run.stdout}\n{run.stderr}")
    return {name: out / name for name in names}


@pytest.mark.parametrize("name", ["retinanet", "fcos", "ssdlite", "mask_rcnn"])
def test_each_detector_class_exports_with_its_thresholds_and_passes_its_proof(families, name):
    import vision_models

    log = (families[name].parent / "exports.log").read_text()
    assert (families[name] / "equivalence.json").is_file(), log[-3000:]
    report = json.loads((families[name] / "equivalence.json").read_text())
    assert report["passed"] and {c["backend"] for c in report["checks"]} == {"torchscript", "onnx"}
    for c in report["checks"]:
        assert c["worst"]["judged"] >= 8 and c["worst"]["matched"] == c["worst"]["judged"], (name, c["worst"])
    model = getattr(vision_models, name)()
    holder = model.roi_heads if name == "mask_rcnn" else model
    card = ModelCard.load(families[name])
    assert card.task == "detect" and card.thresholds == {
        "score": holder.score_thresh,
        "iou": holder.nms_thresh,
        "detections": holder.detections_per_img,
    }
    assert card.input_shape == (3, vision_models.SIZE, vision_models.SIZE)  # FCOS's from its transform's min_size
    graph = onnx.load(str(families[name] / "model.onnx")).graph
    assert [o.name for o in graph.output] == ["boxes", "scores", "labels"]


def test_a_mask_rcnn_says_its_masks_are_not_exported_and_answers_as_its_boxes_do(families):
    """The note is printed once, for the Mask R-CNN alone; its exported answer is eager's boxes with the mask head."""
    import onnxruntime as ort
    from vision_models import mask_rcnn, scene

    log = (families["mask_rcnn"].parent / "exports.log").read_text()
    assert log.count("note: the model also answers masks: the export answers its boxes, scores and labels") == 1
    model = mask_rcnn()
    model.load_state_dict(torch.load(families["mask_rcnn"].parent / "mask_rcnn.pt", weights_only=True))
    x, target, _ = scene(torch.Generator().manual_seed(7), shapes=2)
    with torch.no_grad():
        eager = model.eval()([x])[0]
    assert len(eager["boxes"]) >= 1 and eager["masks"].shape[0] == len(eager["boxes"])  # eager has masks
    session = ort.InferenceSession(str(families["mask_rcnn"] / "model.onnx"), providers=["CPUExecutionProvider"])
    boxes, scores, labels = session.run(None, {session.get_inputs()[0].name: x[None].numpy()})
    np.testing.assert_allclose(boxes, eager["boxes"].numpy(), atol=1e-3)
    np.testing.assert_allclose(scores, eager["scores"].numpy(), atol=1e-4)
    assert labels.tolist() == eager["labels"].tolist()
