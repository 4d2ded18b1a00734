"""The detector `make bench` serves (bench/heavy.py): torchvision's mobile Faster R-CNN (MobileNetV3-Large 320
FPN, 91 COCO classes, fixed-seed weights, nothing downloaded), on JPEG photos of several shapes. Untrained weights
answer 100 tied boxes an image (the post-processing's worst case), which no proof can judge (docs/export.md): the
export is written without one, for speed only."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from torchship.serve.loadtest import Payload

SPEC = "torchvision.models.detection:fasterrcnn_mobilenet_v3_large_320_fpn"
KWARGS = {"num_classes": 91, "weights_backbone": None}
SIDE = 320  # the model's own working size (min_size)
SIZES = ((427, 640), (640, 427), (300, 300), (240, 600))  # photo crops of several shapes: the letterbox varies


def build(work: Path) -> Path:
    """The export (TorchScript-based ONNX, one image a pass), through the API `torchship export` calls, no proof."""
    import torch

    from torchship.export.formats import export_model, stamp
    from torchship.export.user_model import build as build_model
    from torchship.export.user_model import user_model

    out = work / "detector"
    if (out / "model.onnx").is_file():
        return out
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(build_model(SPEC, KWARGS).state_dict(), work / "detector.pt")
    model, card = user_model(SPEC, work / "detector.pt", kwargs=KWARGS, input_shape=(3, SIDE, SIDE), name="detector")
    card = stamp(card, work / "detector.pt", version="1")
    export_model(model, card, out, ("onnx",))
    return out


def photos(n: int = 32) -> list[Payload]:
    """JPEG crops of scikit-learn's two bundled photos at several shapes, resized: real pictures of any size."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    source = [Image.fromarray(p) for p in load_sample_images().images]
    rng, out = np.random.default_rng(1), []
    for i in range(n):
        photo, (h, w) = source[i % len(source)], SIZES[i % len(SIZES)]
        side = min(photo.width, photo.height)
        x, y = int(rng.integers(0, photo.width - side + 1)), int(rng.integers(0, photo.height - side + 1))
        buf = io.BytesIO()
        photo.crop((x, y, x + side, y + side)).resize((w, h)).save(buf, "JPEG", quality=90)
        out.append(Payload(buf.getvalue(), None, "image/jpeg"))
    return out
