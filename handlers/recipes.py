"""How an input reaches the model: the recipes a card may name for an image or a tensor, and the rules a card of one
image or one tensor keeps; stdlib only. The recipes themselves run in model/images.py and model/tensors.py."""

from __future__ import annotations

import math
from collections.abc import Callable

from .fields import is_number
from .signature import TENSOR_NAME

# How an image someone sends is brought to the model's input (model/images.py implements each).
IMAGE_RECIPES = ("mnist-digit", "fashion", "resize", "resize-crop", "letterbox")
# The recipe whose answers (boxes, masks) are given back in the sent image's own pixels: detectors' and segmenters'
FRAMED_RECIPE = "letterbox"
NO_RECIPE = "none"  # named inputs: the model takes what the client sends, checked against the signature
TENSOR_RECIPE = "standardize"  # (x - mean) / std per entry of the first axis; mean 0, std 1 leaves x as it is
RECIPES = (*IMAGE_RECIPES, TENSOR_RECIPE)
MAX_TENSOR_ELEMENTS = 1 << 20  # per example
GREY_RECIPES = ("mnist-digit", "fashion")  # they find light ink on a dark ground: one channel only
CROP_RATIO = 0.875  # torchvision's classification presets: resize to 256, centre-crop 224


def validate_single(card, need: Callable[[bool, str, str], None]) -> None:
    """An image card's or a one-tensor card's fields (CARD: the ModelCard being built, which calls this)."""
    shape = card.input_shape
    need(
        all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape),
        "input_shape",
        f"expected positive integers, got {list(shape)}",
    )
    if card.image:
        need(len(shape) == 3, "input_shape", f"an image input is C,H,W: three integers, got {list(shape)}")
        need(shape[0] in (1, 3), "input_shape", f"{shape[0]} channels: images have 1 (grey) or 3 (RGB)")
        need(
            all(4 <= v <= 4096 for v in shape[1:]), "input_shape", f"height and width must be 4..4096, got {shape[1:]}"
        )
        need(
            card.preprocess in IMAGE_RECIPES,
            "preprocess",
            f"{card.preprocess!r} is not one of {', '.join(IMAGE_RECIPES)}",
        )
    else:
        need(
            1 <= len(shape) <= 4 and math.prod(shape) <= MAX_TENSOR_ELEMENTS,
            "input_shape",
            f"a tensor input is 1 to 4 dimensions of at most {MAX_TENSOR_ELEMENTS} numbers, got {list(shape)}",
        )
        need(
            card.preprocess == TENSOR_RECIPE,
            "preprocess",
            f"tensor inputs are prepared by {TENSOR_RECIPE!r} (mean and std), not {card.preprocess!r}",
        )
        need(card.task != "reconstruct", "task", "reconstruction is for image models")
        need(
            not card.input_range or len(card.input_range) == shape[0],
            "input_range",
            f"one (min, max) per entry of the first axis ({shape[0]}), got {len(card.input_range)}",
        )
        need(
            all(
                isinstance(r, tuple)
                and len(r) == 2
                and all(is_number(v) and math.isfinite(v) for v in r)
                and r[0] < r[1]
                for r in card.input_range
            ),
            "input_range",
            "each entry must be [min, max] with min < max",
        )
    for name in ("mean", "std"):
        values = getattr(card, name)
        what = "channel(s)" if card.image else "entries of the first axis"
        need(len(values) == shape[0], name, f"{len(values)} values for {shape[0]} {what}")
        need(all(math.isfinite(v) for v in values), name, f"must be finite, got {list(values)}")
    need(all(s > 0 for s in card.std), "std", f"must be positive, got {list(card.std)}")
    need(
        all(isinstance(x, str) and x.strip() and len(x) <= 200 for x in card.labels),
        "labels",
        "each label must be a non-empty string of at most 200 characters",
    )
    if card.task in ("detect", "segment"):
        need(
            card.image and card.preprocess == FRAMED_RECIPE,
            "preprocess",
            f"a {card.task} model's images are "
            f"prepared by {FRAMED_RECIPE!r} (its answers are mapped back to the sent image), not {card.preprocess!r}",
        )
        need(
            2 <= len(card.labels) <= (256 if card.task == "segment" else 10_000),
            "labels",
            f"a {card.task} model names every class it answers, background first (a segmenter at most 256: its mask "
            "is one byte a pixel)",
        )
    if card.task == "classify":  # a detector's may repeat a placeholder: COCO's 'N/A' for ids it never used
        need(len(card.labels) >= 1, "labels", "a classifier needs at least one label")
        dup = sorted({x for x in card.labels if card.labels.count(x) > 1})
        need(not dup, "labels", f"duplicate labels: {dup[:3]}")
    if card.task == "regress":
        need(not card.labels, "labels", "a regressor has output names, not labels")
        need(
            len(card.output_names) >= 1
            and all(isinstance(n, str) and n.strip() and len(n) <= 64 for n in card.output_names),
            "output_names",
            "a regressor needs one name (at most 64 characters) per output value",
        )
        need(
            not card.units or len(card.units) == len(card.output_names),
            "units",
            f"{len(card.units)} units for {len(card.output_names)} output values",
        )
        need(all(isinstance(u, str) and len(u) <= 32 for u in card.units), "units", "each unit is a short string")
    else:
        need(not card.output_names and not card.units, "output_names", "names and units are for regressors")
    need(
        card.preprocess not in GREY_RECIPES or shape[0] == 1,
        "preprocess",
        f"{card.preprocess!r} makes 1-channel images; the input has {shape[0]} channels (use resize or resize-crop)",
    )
    if card.resize is not None:
        need(
            card.image and isinstance(card.resize, int) and max(shape[1:]) <= card.resize <= 8192,
            "resize",
            f"the shorter side before the crop must be an integer from {max(shape[1:] or (0,))} to 8192, got "
            f"{card.resize!r}",
        )
    for name in ("input_name", "output_name"):
        value = getattr(card, name)
        need(isinstance(value, str) and bool(TENSOR_NAME.match(value)), name, f"{value!r} is not a tensor name")
