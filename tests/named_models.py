"""The models the named-input tests bring, as a user's own file: a small BERT (transformers) and a two-input
tabular model with three outputs; and how a user exports one."""

import subprocess

import torch

from helpers import TORCHSHIP

VOCAB = 1000
NAMED = {"bert": ("bert", "BERT"), "shop": ("Shop", "SHOP"), "detector": ("Detector", "DETECTOR")}  # factory, signature
MODELS = '''
import torch


def bert():
    from transformers import BertConfig, BertForSequenceClassification  # here: importing it costs the others ~9 s

    config = BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=3)
    return BertForSequenceClassification(config)


BERT = {
    "inputs": [
        {"name": "input_ids", "datatype": "INT64", "shape": ["batch", "sequence"], "range": [0, 999], "pad": 0},
        {"name": "attention_mask", "datatype": "INT64", "shape": ["batch", "sequence"], "range": [0, 1], "pad": 0,
         "mask": True},
    ],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": ["batch", 3]}],
    "dims": {"sequence": [1, 128]},
}


class Shop(torch.nn.Module):
    """Dense features and two categorical ids in; a score, three logits and a count out."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.hidden = torch.nn.Linear(13 + 8, 16)
        self.score = torch.nn.Linear(16, 1)
        self.kind = torch.nn.Linear(16, 3)

    def forward(self, dense, ids):
        h = torch.relu(self.hidden(torch.cat([dense, self.embed(ids).flatten(1)], 1)))
        return {"score": torch.sigmoid(self.score(h)), "kind_logits": self.kind(h), "high_ids": (ids > 4).sum(1)}


class Detector(torch.nn.Module):
    """Detection-style, from torchvision's parts: a small conv backbone, a box and a class per cell of an 8x8 grid,
    and the ten best as boxes (xyxy, pixels), scores and INT64 labels: a fixed number of detections a row."""

    def __init__(self, classes: int = 3, keep: int = 10):
        super().__init__()
        from torchvision.ops.misc import Conv2dNormActivation

        self.backbone = torch.nn.Sequential(Conv2dNormActivation(3, 8, stride=2), Conv2dNormActivation(8, 16, stride=2),
                                            Conv2dNormActivation(16, 16, stride=2))
        self.box = torch.nn.Conv2d(16, 4, 1)
        self.cls = torch.nn.Conv2d(16, classes, 1)
        self.register_buffer("prior", torch.linspace(0, 16, 64))  # per cell, as anchors have: ranks far from ties
        self.keep = keep

    def cells(self, images):
        """Features, and each cell's best class score (with its prior) and that class."""
        f = self.backbone(images)
        best, labels = (self.cls(f).flatten(2).transpose(1, 2) + self.prior[:, None]).max(-1)
        return f, best, labels

    def forward(self, images):
        from torchvision.ops import box_convert

        f, best, labels = self.cells(images)
        h, w = f.shape[-2:]
        scores, order = best.topk(self.keep, dim=1)
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        centres = torch.stack([xs, ys], -1).reshape(1, -1, 2).to(images.dtype) * (images.shape[-1] / w)
        raw = self.box(f).flatten(2).transpose(1, 2)
        cxcywh = torch.cat([centres + raw[..., :2], torch.nn.functional.softplus(raw[..., 2:]) * 8], -1)
        boxes = box_convert(cxcywh, "cxcywh", "xyxy")
        pick = order.unsqueeze(-1)
        return {"boxes": boxes.gather(1, pick.expand(-1, -1, 4)), "scores": scores,
                "labels": labels.gather(1, order)}


DETECTOR = {
    "inputs": [{"name": "images", "datatype": "FP32", "shape": ["batch", 3, 64, 64], "range": [0, 1]}],
    "outputs": [{"name": "boxes", "datatype": "FP32", "shape": ["batch", 10, 4]},
                {"name": "scores", "datatype": "FP32", "shape": ["batch", 10]},
                {"name": "labels", "datatype": "INT64", "shape": ["batch", 10]}],
}


SHOP = {
    "inputs": [{"name": "dense", "datatype": "FP32", "shape": ["batch", 13], "range": [-3, 3]},
               {"name": "ids", "datatype": "INT64", "shape": ["batch", 2], "range": [0, 9]}],
    "outputs": [{"name": "score", "datatype": "FP32", "shape": ["batch", 1]},
                {"name": "kind_logits", "datatype": "FP32", "shape": ["batch", 3]},
                {"name": "high_ids", "datatype": "INT64", "shape": ["batch"]}],
}
'''


def export(tmp, name: str, factory: str, sig: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"named_models_{name}", tmp / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    model = getattr(module, factory)().eval()
    torch.save(model.state_dict(), tmp / f"{name}.pt")
    out = tmp / name
    run = subprocess.run(
        [
            *TORCHSHIP,
            "export",
            "--model",
            f"{tmp / 'models.py'}:{factory}",
            "--weights",
            str(tmp / f"{name}.pt"),
            "--signature",
            f"{tmp / 'models.py'}:{sig}",
            "--name",
            name,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=tmp,
    )
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-3000:]
    return out, run.stdout
