"""The proof for a detector: each format answers the same detections as eager PyTorch on drawn scenes of several
sizes (some with nothing to find), matched one to one.

Element-wise error cannot judge a detector: non-maximum suppression keeps one of two overlapping boxes by their
order, so a score that moves by 1e-7 may swap which box survives (ONNX's NonMaxSuppression and torchvision's nms
can order ties differently, pytorch/pytorch#134827). So, per image: every eager detection clear of the score
threshold and of every other detection's score (by SCORE_TOL) must have a partner in the format's answer with the
same label, IoU >= MIN_IOU and a score within SCORE_TOL; the format may answer nothing clear of them that eager
did not. Detections near the threshold or tied are counted and left out; too few left to judge fails the proof."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from torchship.export.proof.checks import load_for_proof
from torchship.export.proof.report import Check, Report, VerificationError
from torchship.handlers.card import ModelCard
from torchship.handlers.formats import FORMAT_BY_NAME
from torchship.handlers.model import runners
from torchship.handlers.model.images import Preprocessor, framed
from torchship.handlers.model.vision import PAD, detect_runner

SCORE_TOL = 1e-3  # scores this close to the threshold or to each other are not judged
MIN_IOU = 0.99
MIN_JUDGED = 8  # detections judged over the whole set, at least
SCENES = 24
# Sizes as multiples of the card's (height, width): the letterbox shrinks, grows and pads each differently
SIZES = ((1, 1), (0.5, 1), (2, 1.5), (0.75, 2), (1.6, 0.6), (0.3, 0.3))


def scenes(card: ModelCard, n: int = SCENES, seed: int = 0) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """N letterboxed scenes (Framed: each remembers its size): rectangles of saturated colours on a dark noisy ground;
    every fourth holds none."""
    rng = np.random.default_rng(seed)
    prep, arrays = Preprocessor(card), []
    _, height, width = card.input_shape
    for i in range(n):
        fy, fx = SIZES[i % len(SIZES)]
        h, w = max(8, round(height * fy)), max(8, round(width * fx))
        pixels = (rng.random((h, w, 3)) * 50).astype(np.uint8)
        for _ in range(0 if i % 4 == 3 else int(rng.integers(1, 4))):
            bh = int(rng.integers(h // 6, max(h // 6 + 1, h // 2)))
            bw = int(rng.integers(w // 6, max(w // 6 + 1, w // 2)))
            y, x = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
            pixels[y : y + bh, x : x + bw] = rng.permutation([230, int(rng.integers(0, 60)), int(rng.integers(0, 60))])
        arrays.append(prep.from_pixels(pixels))
    batch = framed(arrays)
    return batch, list(batch.sizes)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def compare(ref: np.ndarray, got: np.ndarray, threshold: float) -> dict:
    """Packed (N, K, 6) answers (handlers/model/vision.py), judged as the module docstring says."""
    judged = matched = excluded = 0
    missing, extra, box_err, score_err = [], [], [0.0], [0.0]
    for i, (r, g) in enumerate(zip(ref, got)):
        r, g = r[r[:, 5] != PAD], g[g[:, 5] != PAD]
        scores = r[:, 4]
        unsure = [
            bool(abs(s - threshold) <= SCORE_TOL or np.count_nonzero(np.abs(scores - s) <= SCORE_TOL) > 1)
            for s in scores
        ]
        excluded += sum(unsure)
        used: set[int] = set()
        for k in np.argsort(-scores):
            if unsure[k]:
                continue
            judged += 1
            partners = [j for j in range(len(g)) if j not in used and g[j, 5] == r[k, 5]]
            best = max(partners, key=lambda j: iou(r[k], g[j]), default=None)
            if best is None or iou(r[k], g[best]) < MIN_IOU or abs(g[best, 4] - r[k, 4]) > SCORE_TOL:
                missing.append({"image": i, "box": r[k, :4].tolist(), "score": float(r[k, 4]), "label": int(r[k, 5])})
                continue
            used.add(best)
            matched += 1
            box_err.append(float(np.abs(g[best, :4] - r[k, :4]).max()))
            score_err.append(float(abs(g[best, 4] - r[k, 4])))
        near = scores[np.asarray(unsure, bool)] if len(scores) else scores
        for j in range(len(g)):
            s = g[j, 4]
            if j in used or abs(s - threshold) <= SCORE_TOL or np.any(np.abs(near - s) <= SCORE_TOL):
                continue
            extra.append({"image": i, "box": g[j, :4].tolist(), "score": float(s), "label": int(g[j, 5])})
    return {
        "judged": judged,
        "matched": matched,
        "excluded": excluded,
        "missing": missing,
        "extra": extra,
        "max_box_error": max(box_err),
        "max_score_error": max(score_err),
    }


def verify_detections(export_dir: Path, source: Path | str | None) -> Report:
    card, model, formats = load_for_proof(export_dir, source)
    x, sizes = scenes(card)
    k = card.thresholds["detections"]
    eager = detect_runner(runners.torch_runner(model, all_outputs=True), k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = eager(x)
        checks = []
        for name in formats:
            fmt = FORMAT_BY_NAME[name]
            run = runners.load(export_dir, fmt.backend, threads=torch.get_num_threads(), card=card).run
            checks.append(detection_check(fmt.backend, ref, run(x), card.thresholds["score"]))
    if not checks:
        raise VerificationError(f"{export_dir} holds no exported model: run `torchship export` first")
    inputs = {
        "detect": True,
        "total": len(x),
        "sizes": sorted({f"{w}x{h}" for h, w in sizes}),
        "empty": int(sum((r[:, 5] == PAD).all() for r in ref)),
        "detections": int((ref[..., 5] != PAD).sum()),
        "shape": list(x.shape[1:]),
        "thresholds": dict(card.thresholds),
        "rules": f"same label, IoU >= {MIN_IOU}, score within {SCORE_TOL}; at least {MIN_JUDGED} judged",
        "min_judged": MIN_JUDGED,
    }
    return Report(str(export_dir), SCORE_TOL, 0.0, f"eager PyTorch, float32 ({card.name})", inputs, checks)


def detection_check(backend: str, ref: np.ndarray, got: np.ndarray, threshold: float) -> Check:
    shape_ok, dtype_ok = got.shape == ref.shape, got.dtype == np.float32
    found = compare(ref, got, threshold) if shape_ok else {"judged": 0, "missing": [], "extra": []}
    failures = len(found["missing"]) + len(found["extra"])
    passed = shape_ok and dtype_ok and failures == 0 and found["judged"] >= MIN_JUDGED
    return Check(
        backend,
        1,
        SCORE_TOL,
        0.0,
        passed,
        shape_ok,
        dtype_ok,
        nan=int(np.isnan(got).sum()),
        failures=failures,
        elements=found["judged"],
        max_abs=found.get("max_box_error", float("nan")),
        mean_abs=found.get("max_score_error", float("nan")),
        p99_abs=found.get("max_score_error", float("nan")),
        max_rel=None,
        p99_rel=None,
        min_atol=found.get("max_score_error", float("nan")),
        min_rtol=0.0,
        top1_agreement=found["matched"] / found["judged"] if found.get("judged") else None,
        worst=found,
    )
