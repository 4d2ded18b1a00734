"""What a torchvision weights enum says about its images (`--weights-enum`): the preset its `transforms()` builds (mean,
std, resize and crop) and its `meta["categories"]`, read without downloading the weights, so the card states what
the weights were trained to see."""

from __future__ import annotations

import importlib
from dataclasses import dataclass


class WeightsEnumError(Exception):
    """The reference names no torchvision weights enum member; one line for the user."""


@dataclass(frozen=True)
class Preset:
    """The facts a card takes from a weights enum; None where its transforms do not say (a detector normalises inside
    the model)."""

    name: str
    labels: tuple[str, ...]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resize: int | None = None  # classification: the shorter side before the crop; segmentation: the working size
    crop: int | None = None  # classification: the centre crop, the model's input size


def read(reference: str) -> Preset:
    """`module:Enum.MEMBER`, e.g. torchvision.models:ResNet50_Weights.IMAGENET1K_V2."""
    where, sep, attr = reference.rpartition(":")
    if not sep or not where or "." not in attr:
        raise WeightsEnumError(f"--weights-enum {reference!r}: expected module:Enum.MEMBER")
    try:
        obj = importlib.import_module(where)
    except Exception as e:
        raise WeightsEnumError(f"--weights-enum {reference!r}: cannot import {where} ({type(e).__name__})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise WeightsEnumError(f"--weights-enum {reference!r}: {where} has no {attr}")
        obj = getattr(obj, part)
    if not (callable(getattr(obj, "transforms", None)) and isinstance(getattr(obj, "meta", None), dict)):
        raise WeightsEnumError(f"--weights-enum {reference!r}: not a torchvision weights enum member")
    transform = obj.transforms()
    first = lambda v: v[0] if isinstance(v, (list, tuple)) and v else v  # noqa: E731 - [224] -> 224
    mean, std = getattr(transform, "mean", None), getattr(transform, "std", None)
    return Preset(
        name=reference,
        labels=tuple(str(c) for c in obj.meta.get("categories") or ()),
        mean=tuple(mean) if mean else None,
        std=tuple(std) if std else None,
        resize=first(getattr(transform, "resize_size", None)),
        crop=first(getattr(transform, "crop_size", None)),
    )
