"""What a detector's and a segmenter's outputs mean to a client, in the pixels of the image it sent; numpy and Pillow
only, one implementation for every runtime (both servers, the embedding) and the proof.

A detector's exported graph takes one letterboxed image and answers its n boxes (x1, y1, x2, y2), scores and labels,
the card's thresholds applied inside the graph. A batch of them becomes one (N, K, 6) array, K the card's most
detections an image, rows past an image's n labelled -1: every runtime's batching and splitting stays that of one
array, and an image with no box is a row of padding like any other. A segmenter's logits (N, classes, H, W) become
a class per pixel once a pass (class_maps); each image's mask is cut from its letterbox and brought back to its size.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable

import numpy as np
from PIL import Image

from ..card import ModelCard
from .images import fitted_size

FIELDS = 6  # a packed detection: x1, y1, x2, y2, score, label
PAD = -1  # the label of a padding row


def detect_runner(run_one: Callable, k: int) -> Callable:
    """A batch through a graph that takes one image a pass (torchvision's detectors take a list of images, and an
    exported graph is traced for one), packed as the module docstring says."""

    def run(x: np.ndarray) -> np.ndarray:
        out = np.zeros((len(x), k, FIELDS), np.float32)
        out[..., 5] = PAD
        for i in range(len(x)):
            boxes, scores, labels = run_one(np.ascontiguousarray(x[i : i + 1], dtype=np.float32))
            n = min(len(scores), k)
            out[i, :n, :4] = np.asarray(boxes[:n], np.float32).reshape(n, 4)
            out[i, :n, 4] = scores[:n]
            out[i, :n, 5] = labels[:n]
        return out

    return run


def unpack(card: ModelCard, rows: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's detections: boxes in its own pixels (the letterbox undone, clipped to the image), scores, labels."""
    keep = rows[:, 5] >= 0
    h, w = size
    nh, nw = fitted_size(h, w, *card.input_shape[1:])
    boxes = rows[keep, :4] * np.array([w / nw, h / nh, w / nw, h / nh], np.float32)
    boxes = np.clip(boxes, 0, np.array([w, h, w, h], np.float32))
    return boxes.astype(np.float32), rows[keep, 4].copy(), rows[keep, 5].astype(np.int32)


def detection_answers(card: ModelCard, packed: np.ndarray, sizes) -> list[list[dict]]:
    """TorchServe's object_detector answer per image: [{label: [x1, y1, x2, y2], "score": s}, ...], best first."""
    out = []
    for rows, size in zip(packed, sizes):
        boxes, scores, labels = unpack(card, rows, size)
        out.append(
            [
                {card.labels[int(c)]: [round(float(v), 2) for v in b], "score": round(float(s), 6)}
                for b, s, c in zip(boxes, scores, labels)
            ]
        )
    return out


def detection_tensors(card: ModelCard, packed: np.ndarray, sizes) -> dict[str, np.ndarray]:
    """The v2 answer: boxes FP32 [N, K, 4], scores FP32 [N, K], labels INT32 [N, K] (-1 past count), names BYTES
    [N, K] ("" past count), count INT32 [N]: Triton's fixed top-K with a count, so an image with no box splits
    like any other."""
    n, k = packed.shape[:2]
    boxes, scores = np.zeros((n, k, 4), np.float32), np.zeros((n, k), np.float32)
    labels, names = np.full((n, k), PAD, np.int32), np.full((n, k), b"", dtype=object)
    count = np.zeros(n, np.int32)
    for i, (rows, size) in enumerate(zip(packed, sizes)):
        b, s, c = unpack(card, rows, size)
        m = count[i] = len(s)
        boxes[i, :m], scores[i, :m], labels[i, :m] = b, s, c
        names[i, :m] = [card.labels[j].encode() for j in c]
    return {"boxes": boxes, "scores": scores, "labels": labels, "names": names, "count": count}


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def class_maps(logits: np.ndarray) -> np.ndarray:
    """A class per pixel, (N, H, W) uint8 (a segmenter has at most 256 classes: the card checks)."""
    return np.asarray(logits).argmax(1).astype(np.uint8)


def mask(card: ModelCard, class_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One image's class map cut from its letterbox and brought to its own size (nearest: classes do not blend)."""
    h, w = size
    nh, nw = fitted_size(h, w, *card.input_shape[1:])
    cut = np.ascontiguousarray(class_map[:nh, :nw])
    if (nh, nw) == (h, w):
        return cut
    return np.asarray(Image.fromarray(cut).resize((w, h), Image.Resampling.NEAREST))


def counts(card: ModelCard, m: np.ndarray) -> np.ndarray:
    return np.bincount(m.ravel(), minlength=len(card.labels))[: len(card.labels)].astype(np.int32)


def segment_answers(card: ModelCard, maps: np.ndarray, sizes) -> list[dict]:
    """JSON per image: the mask as a PNG (each pixel its class index), the pixels of each class, the image's size."""
    out = []
    for class_map, size in zip(maps, sizes):
        m = mask(card, class_map, size)
        pixels = counts(card, m)
        out.append(
            {
                "mask_png_base64": base64.b64encode(png(m)).decode("ascii"),
                "counts": {label: int(c) for label, c in zip(card.labels, pixels) if c},
                "size": [int(size[0]), int(size[1])],
            }
        )
    return out


def segment_tensors(card: ModelCard, maps: np.ndarray, sizes) -> dict[str, np.ndarray]:
    """The v2 answer: mask UINT8 [N, H, W] at the sent images' size (one size a request: model_io checks), counts
    INT32 [N, classes]."""
    masks = [mask(card, m, size) for m, size in zip(maps, sizes)]
    return {"mask": np.stack(masks), "counts": np.stack([counts(card, m) for m in masks])}
