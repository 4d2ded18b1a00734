"""The detector and the segmenter the tests export and serve, as a user would bring them: torchvision's FasterRCNN
and FCN classes on a small backbone of their own, trained for a few seconds on synthetic scenes (red and green
rectangles on a dark noisy ground, 128 x 128) so that their answers are well defined: a random-weight torchvision
detector answers its 100 boxes at one tied score (0.3383 here), which no proof can judge. Run as a script it trains
both and saves their state dicts: `python tests/vision_models.py OUT_DIR`."""

import sys
from collections import OrderedDict
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.ssdlite import SSDLiteHead
from torchvision.models.segmentation.fcn import FCN, FCNHead

SIZE = 128
LABELS = ["__background__", "red", "green"]
STEPS = {"detector": 120, "segmenter": 80}
FAMILIES = ("retinanet", "fcos", "ssdlite")  # torchvision's other detector classes, each on the same backbone
# ... trained by train_families, which also gives a Mask R-CNN the trained detector's weights


def backbone() -> nn.Sequential:
    layers = nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU(),
    )  # fmt: skip
    layers.out_channels = 32
    return layers


def detector(num_classes: int = 3, **kwargs) -> FasterRCNN:
    """A Faster R-CNN at 128 pixels: small proposal counts keep training to seconds on two cores."""
    torch.manual_seed(0)
    return FasterRCNN(backbone(), num_classes=num_classes, **{**rcnn_settings(), **kwargs})


def mask_rcnn(num_classes: int = 3, **kwargs) -> MaskRCNN:
    """The same with Mask R-CNN's mask head: the tests give it the detector's trained weights, the mask head as
    initialised (its masks are not exported)."""
    torch.manual_seed(0)
    return MaskRCNN(backbone(), num_classes=num_classes, **{**rcnn_settings(), **kwargs})


def rcnn_settings() -> dict:
    anchors = AnchorGenerator(sizes=((16, 32, 64),), aspect_ratios=((0.5, 1.0, 2.0),))
    return dict(
        rpn_anchor_generator=anchors,
        min_size=SIZE,
        max_size=SIZE,
        rpn_pre_nms_top_n_train=300,
        rpn_post_nms_top_n_train=100,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=100,
        rpn_batch_size_per_image=64,
        box_batch_size_per_image=64,
        box_score_thresh=0.3,
    )


class Features(nn.Module):
    """The backbone as RetinaNet, FCOS and SSD take one: named feature maps."""

    def __init__(self):
        super().__init__()
        self.body, self.out_channels = backbone(), 32

    def forward(self, x: torch.Tensor) -> OrderedDict:
        return OrderedDict([("0", self.body(x))])


def retinanet(num_classes: int = 3, **kwargs) -> RetinaNet:
    """RetinaNet with v2's GroupNorm head: v1's head, four convolutions initialised at std 0.01, learns nothing in
    seconds (every score stays at the prior's)."""
    torch.manual_seed(0)
    anchors = AnchorGenerator(sizes=((16, 32, 64),), aspect_ratios=((0.5, 1.0, 2.0),))
    head = RetinaNetHead(32, anchors.num_anchors_per_location()[0], num_classes, norm_layer=partial(nn.GroupNorm, 8))
    settings = dict(min_size=SIZE, max_size=SIZE, score_thresh=0.2, anchor_generator=anchors, head=head)
    return RetinaNet(Features(), num_classes, **{**settings, **kwargs})


def fcos(num_classes: int = 3, **kwargs) -> FCOS:
    torch.manual_seed(0)
    anchors = AnchorGenerator(sizes=((32,),), aspect_ratios=((1.0,),))
    settings = dict(min_size=SIZE, max_size=SIZE, score_thresh=0.3, anchor_generator=anchors)
    return FCOS(Features(), num_classes, **{**settings, **kwargs})


def ssdlite(num_classes: int = 3, **kwargs) -> SSD:
    """SSD with SSDlite's head (depthwise convolutions), as ssdlite320_mobilenet_v3_large builds it."""
    torch.manual_seed(0)
    anchors = DefaultBoxGenerator([[2, 3]])
    head = SSDLiteHead([32], anchors.num_anchors_per_location(), num_classes, partial(nn.BatchNorm2d, eps=0.001))
    return SSD(Features(), anchors, (SIZE, SIZE), num_classes, head=head, **{"score_thresh": 0.3, **kwargs})


def segmenter(num_classes: int = 3) -> FCN:
    """torchvision's FCN (answers {'out': logits at the input's size}) on the same small backbone."""
    torch.manual_seed(0)
    return FCN(IntermediateLayerGetter(backbone(), {"7": "out"}), FCNHead(32, num_classes))


def scene(g: torch.Generator, size: tuple[int, int] = (SIZE, SIZE), shapes: int | None = None):
    """An image in [0, 1] (3, H, W), its rectangles' boxes and labels, and its class per pixel."""
    h, w = size
    x = torch.rand(3, h, w, generator=g) * 0.2
    mask = torch.zeros(h, w, dtype=torch.int64)
    boxes, labels = [], []
    count = int(torch.randint(1, 3, (1,), generator=g)) if shapes is None else shapes
    for _ in range(count):
        bw, bh = (int(v) for v in torch.randint(min(h, w) // 6, int(min(h, w) / 2.5), (2,), generator=g))
        x0, y0 = int(torch.randint(0, w - bw, (1,), generator=g)), int(torch.randint(0, h - bh, (1,), generator=g))
        c = int(torch.randint(1, 3, (1,), generator=g))
        x[c - 1, y0 : y0 + bh, x0 : x0 + bw] = 0.9
        mask[y0 : y0 + bh, x0 : x0 + bw] = c
        boxes.append([x0, y0, x0 + bw, y0 + bh])
        labels.append(c)
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels)}
    return x, target, mask


def fit_detector(model: nn.Module, steps: int, opt: torch.optim.Optimizer, g: torch.Generator) -> nn.Module:
    model.train()
    for _ in range(steps):
        images, targets, _ = zip(*(scene(g) for _ in range(4)))
        loss = sum(model(list(images), list(targets)).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def train_families(out_dir: Path, detector_weights: Path) -> dict[str, Path]:
    """RetinaNet, FCOS and SSDlite, trained, and a Mask R-CNN with the trained detector's weights; name -> state dict
    file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    g, files = torch.Generator().manual_seed(0), {"mask_rcnn": out_dir / "mask_rcnn.pt"}
    masked = mask_rcnn()
    missing = masked.load_state_dict(torch.load(detector_weights, weights_only=True), strict=False).missing_keys
    assert missing and all(".mask_" in k for k in missing), missing
    torch.save(masked.state_dict(), files["mask_rcnn"])
    for name, build in zip(FAMILIES, (retinanet, fcos, ssdlite)):
        model = build()
        opt = (
            torch.optim.Adam(model.parameters(), lr=0.01)
            if name == "retinanet"
            else torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        )
        files[name] = out_dir / f"{name}.pt"
        torch.save(fit_detector(model, 120, opt, g).state_dict(), files[name])
    return files


def train(out_dir: Path) -> dict[str, Path]:
    """Both models, trained and saved; name -> state dict file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    det = detector()
    det = fit_detector(det, STEPS["detector"], torch.optim.SGD(det.parameters(), lr=0.02, momentum=0.9), g)
    seg = segmenter().train()
    opt = torch.optim.Adam(seg.parameters(), lr=0.01)
    for _ in range(STEPS["segmenter"]):
        images, _, masks = zip(*(scene(g) for _ in range(8)))
        loss = nn.functional.cross_entropy(seg(torch.stack(images))["out"], torch.stack(masks))
        opt.zero_grad()
        loss.backward()
        opt.step()
    files = {"detector": out_dir / "detector.pt", "segmenter": out_dir / "segmenter.pt"}
    torch.save(det.state_dict(), files["detector"])
    torch.save(seg.state_dict(), files["segmenter"])
    return files


if __name__ == "__main__":  # threads as OMP_NUM_THREADS says: make test gives each of its workers one
    print(train_families(Path(sys.argv[1]), Path(sys.argv[2])) if sys.argv[2:] else train(Path(sys.argv[1])))
