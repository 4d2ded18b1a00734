"""Detectors and segmenters (torchvision's, or a user's answering as they do): each wrapped into the one form every
format exports, its card written with the thresholds the exported graph applies.

A detector answers a list of {boxes, scores, labels} (torchvision's detection API); a segmenter a dict with `out`
(logits at the input's size). Both take letterboxed images of the card's size (handlers/model/images.py), so a
batch is one array and the answer maps back to the sent image (handlers/model/vision.py)."""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from torchship.handlers.card import THRESHOLD_KEYS, Architecture, ModelCard
from torchship.handlers.recipes import FRAMED_RECIPE

# Where torchvision's detectors keep their thresholds: (object, score, NMS IoU, detections an image). R-CNNs in
# roi_heads; RetinaNet, FCOS and SSD on the model itself.
THRESHOLD_ATTRIBUTES = (
    ("roi_heads", "score_thresh", "nms_thresh", "detections_per_img"),
    ("", "score_thresh", "nms_thresh", "detections_per_img"),
)
BACKGROUND = "__background__"  # class 0 of torchvision's detectors, as their weights' categories name it


def kind_of(out) -> str | None:
    """'detect' for a list of dicts with boxes, scores and labels; 'segment' for a dict with `out`; else None."""
    if isinstance(out, (list, tuple)) and out and all(isinstance(d, Mapping) for d in out):
        if all({"boxes", "scores", "labels"} <= set(d) for d in out):
            return "detect"
    if isinstance(out, Mapping) and isinstance(out.get("out"), torch.Tensor) and out["out"].dim() == 4:
        return "segment"
    return None


class Detector(torch.nn.Module):
    """One letterboxed image (1, 3, H, W) in; its boxes (x1, y1, x2, y2 in the letterbox's pixels), scores and
    labels out, the model's own thresholds applied. One image a pass: a detector takes a list, and the ONNX
    exporter (TorchScript-based: torch.export cannot trace NMS, pytorch/vision#9306) traces one."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        images = list(x.unbind(0))
        if torch.jit.is_scripting():  # a scripted detector answers (losses, detections)
            found = self.model(images)[1][0]
        else:
            found = self.model(images)[0]
        return found["boxes"], found["scores"], found["labels"]


class Segmenter(torch.nn.Module):
    """Images (N, C, H, W) in; logits (N, classes, H, W) out: the model's `out`, its auxiliary head left behind."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


DETECTOR_OUTPUTS = ("boxes", "scores", "labels")  # one image's, n of each (Detector)
TRACED_OPSET = 17  # the TorchScript-based exporter's newest opset


def onnx_proto(model: Detector, card: ModelCard):
    """A detector by the TorchScript-based exporter, as PyTorch's own ONNX Runtime tests export torchvision's: the
    dynamo exporter cannot trace non-maximum suppression's data-dependent sizes (pytorch/vision#9306, #9462). One
    image of the card's size in; n boxes, scores and labels out, n dynamic. export/formats.py writes it."""
    import onnx  # lazily: only an ONNX export of a detector reads the file back

    x = torch.rand(1, *card.input_shape, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            str(Path(tmp) / "model.onnx"),
            dynamo=False,
            input_names=[card.input_name],
            output_names=list(DETECTOR_OUTPUTS),
            opset_version=TRACED_OPSET,
            dynamic_axes={name: {0: "detections"} for name in DETECTOR_OUTPUTS},
        )
        return onnx.load(str(Path(tmp) / "model.onnx"))


# Mask and Keypoint R-CNN's extra heads: their boxes, scores and labels are exported, their masks and keypoints are not
UNEXPORTED_HEADS = ("mask", "keypoint")


def unexported(out) -> list[str]:
    """What a detector answers beyond boxes, scores and labels (Mask R-CNN's masks): not exported, and said so."""
    return sorted(set(out[0]) - set(DETECTOR_OUTPUTS))


def wrap(model: torch.nn.Module, task: str) -> torch.nn.Module:
    """The model in the form every format exports; a detector's mask and keypoint heads taken off, so that no format
    computes what none answers."""
    heads = getattr(model, "roi_heads", None) if task == "detect" else None
    for part in UNEXPORTED_HEADS:
        if getattr(heads, f"{part}_roi_pool", None) is not None:
            for role in ("roi_pool", "head", "predictor"):
                setattr(heads, f"{part}_{role}", None)
    return (Detector if task == "detect" else Segmenter)(model).eval()


def working_shape(model: torch.nn.Module) -> tuple[int, int, int] | None:
    """A torchvision detector's own working size, from its transform (SSD's fixed size, else the R-CNNs', RetinaNet's
    and FCOS's shorter side): the letterbox it gets when --input-shape is not given. None for any other model."""
    transform = getattr(model, "transform", None)
    fixed, shorter = getattr(transform, "fixed_size", None), getattr(transform, "min_size", None)
    if fixed:
        return 3, int(fixed[0]), int(fixed[1])
    return (3, int(shorter[-1]), int(shorter[-1])) if shorter else None


def thresholds(model: torch.nn.Module) -> dict:
    """The score threshold, NMS IoU and most detections an image the model applies, read from where torchvision
    keeps them (set them with --model-kwarg: box_score_thresh=0.5 for an R-CNN, score_thresh=0.5 for the others)."""
    for where, score, iou, count in THRESHOLD_ATTRIBUTES:
        holder = getattr(model, where, None) if where else model
        if holder is not None and all(hasattr(holder, a) for a in (score, iou, count)):
            values = (float(getattr(holder, score)), float(getattr(holder, iou)), int(getattr(holder, count)))
            return dict(zip(THRESHOLD_KEYS, values))
    raise ValueError(
        "a detector must keep score_thresh, nms_thresh and detections_per_img (on itself or its roi_heads), as "
        "torchvision's do: the card records the thresholds every format applies"
    )


def vision_card(
    model: torch.nn.Module,
    task: str,
    out,
    *,
    spec: str,
    kwargs: Mapping,
    name: str,
    input_shape: tuple[int, ...],
    labels: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    dataset: str | None,
) -> ModelCard:
    """What a detector or segmenter is; LABELS: every class, background first (default: 0..N-1, 0 the
    background)."""
    classes = int(out["out"].shape[1]) if task == "segment" else _detector_classes(model)
    labels = tuple(labels) or (BACKGROUND, *(str(i) for i in range(1, classes)))
    if classes and len(labels) != classes:
        raise ValueError(f"--labels gives {len(labels)} labels but the model has {classes} classes (background first)")
    return ModelCard(
        name=name,
        task=task,
        input_kind="image",
        input_shape=input_shape,
        mean=tuple(mean),
        std=tuple(std),
        labels=labels,
        preprocess=FRAMED_RECIPE,
        output_kind="detections" if task == "detect" else "logits",
        architecture=Architecture(spec, dict(kwargs)),
        dataset=dataset,
        thresholds=thresholds(model) if task == "detect" else {},
    )


def _detector_classes(model: torch.nn.Module) -> int:
    """torchvision's class count (background included) where its head says it; 0 when it cannot be read."""
    for path in ("roi_heads.box_predictor.cls_score.out_features", "head.classification_head.num_classes"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, int):
            return obj
    return 0
