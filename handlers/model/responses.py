"""What a model's raw output means to a client: probabilities, top-k labels, a reconstruction PNG, values; boxes and
masks (vision.py).

One implementation for every runtime (TorchServe, KServe, the ONNX embedding); numpy and Pillow only.
"""

from __future__ import annotations

import base64

import numpy as np

from ..card import ModelCard
from . import vision
from .vision import png

DEFAULT_TOPK = 3


def softmax(scores: np.ndarray) -> np.ndarray:
    """Probabilities from logits or log-probabilities alike (softmax of log p is p)."""
    z = scores - scores.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def probabilities(card: ModelCard, outputs: np.ndarray) -> np.ndarray:
    """(N, classes) float32 probabilities whatever the model's last layer emits."""
    outputs = np.asarray(outputs, np.float32).reshape(len(outputs), -1)
    if card.output_kind == "probabilities":
        return outputs
    return softmax(outputs).astype(np.float32)


def top_k(probs: np.ndarray, labels: tuple[str, ...] | list[str], k: int = DEFAULT_TOPK) -> dict:
    """The response body of one classification: label, its probability and the top-k."""
    k = max(1, min(k, len(labels)))
    p = probs.tolist()  # plain floats: ten of them are cheaper to sort in Python than through numpy
    order = sorted(range(len(p)), key=p.__getitem__, reverse=True)[:k]
    return {
        "label": labels[order[0]],
        "probability": round(p[order[0]], 6),
        "topk": [{"label": labels[i], "probability": round(p[i], 6)} for i in order],
    }


def to_pixels(card: ModelCard, image: np.ndarray) -> np.ndarray:
    """A normalised (C, H, W) model output back to uint8 (H, W) or (H, W, 3)."""
    c, h, w = card.input_shape
    x = np.asarray(image, np.float32).reshape(c, h, w)
    x = x * np.asarray(card.std, np.float32)[:, None, None] + np.asarray(card.mean, np.float32)[:, None, None]
    x = (np.clip(x, 0, 1) * 255).round().astype(np.uint8)
    return x[0] if c == 1 else x.transpose(1, 2, 0)


def values(card: ModelCard, outputs: np.ndarray) -> list:
    """A regressor's answer per row: its one value, or {name: value} when it has several."""
    rows = np.asarray(outputs, np.float64).reshape(len(outputs), -1).tolist()
    if len(card.output_names) == 1:
        return [row[0] for row in rows]
    return [dict(zip(card.output_names, row)) for row in rows]


def batch_outputs(card: ModelCard, raw):
    """What one forward pass's raw output becomes before its requests' rows are split off: a classifier's
    probabilities, so the softmax runs once per pass, not once per request (bench/NOTES.md lever 54)."""
    if card.task == "segment":
        return vision.class_maps(raw)
    return probabilities(card, raw) if card.task == "classify" else raw


def respond(card: ModelCard, outputs: np.ndarray, topk: list[int] | None = None, sizes=None) -> list:
    """One JSON-ready answer per row of a batch's raw output."""
    return answers(card, batch_outputs(card, outputs), topk, sizes)


def answers(card: ModelCard, outputs: np.ndarray, topk: list[int] | None = None, sizes=None) -> list:
    """One JSON-ready answer per row of batch_outputs. SIZES: each image's own (height, width) for a detector's boxes
    and a segmenter's mask (images.sizes_of); None: the model's input size."""
    if card.task in ("detect", "segment"):
        sizes = sizes or (tuple(card.input_shape[1:]),) * len(outputs)
        return (vision.detection_answers if card.task == "detect" else vision.segment_answers)(card, outputs, sizes)
    if card.task == "regress":
        return values(card, outputs)
    if card.task == "reconstruct":
        return [{"image_png_base64": base64.b64encode(png(to_pixels(card, o))).decode("ascii")} for o in outputs]
    probs = np.asarray(outputs, np.float32).reshape(len(outputs), -1)
    ks = topk or [DEFAULT_TOPK] * len(probs)
    return [top_k(p, card.labels, k) for p, k in zip(probs, ks)]
