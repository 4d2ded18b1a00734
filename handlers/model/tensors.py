"""Brings the numbers people send (tabular rows, signals) into the form the model was trained on; numpy only.

A tensor card's input is a fixed shape per example, e.g. [1], [13] or [3, 128]. Rows arrive as JSON (KServe v1 /
TF Serving `{"instances": [[...], ...]}`) or as a v2 FP32 tensor, and every one is checked before any is run: its
shape, that it holds numbers, that they are finite, that there are not too many. Then `standardize`: (x - mean) /
std per entry of the first axis, as the card records them (mean 0 and std 1 leave x as it is).
"""

from __future__ import annotations

import math

import numpy as np

from ..card import ModelCard
from ..limits import MAX_BATCH_ITEMS
from .errors import InputError


def standardize(card: ModelCard, rows: np.ndarray) -> np.ndarray:
    """Raw rows (N, *shape) to the model's float32 input."""
    rows = np.asarray(rows, np.float32)
    per_first_axis = (1, card.input_shape[0], *[1] * (len(card.input_shape) - 1))
    mean = np.asarray(card.mean, np.float32).reshape(per_first_axis)
    std = np.asarray(card.std, np.float32).reshape(per_first_axis)
    return np.ascontiguousarray((rows - mean) / std, dtype=np.float32)


def _numbers(value, where: str, out: list) -> None:
    """Every number of a nested JSON list, in order; an InputError naming the first thing that is not one."""
    if isinstance(value, list):
        for i, v in enumerate(value):
            _numbers(v, f"{where}[{i}]", out)
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        shown = repr(value)[:40]
        raise InputError(400, f"{where}: {shown} is not a number")
    if not math.isfinite(value):
        raise InputError(400, f"{where}: NaN and Infinity are not numbers a model can take")
    out.append(value)


def _depth_shape(value) -> tuple[int, ...]:
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        value = value[0] if value else None
    return tuple(shape)


def rows_from_instances(card: ModelCard, instances, field: str = "instances") -> np.ndarray:
    """A JSON list of examples to raw float32 rows (N, *shape), every row checked; a row with one number may be sent
    as that number."""
    shape = card.input_shape
    if not isinstance(instances, list) or not instances:
        raise InputError(400, f"'{field}' must be a non-empty list of examples, each of shape {list(shape)}")
    if len(instances) > MAX_BATCH_ITEMS:
        raise InputError(413, f"'{field}' holds {len(instances)} examples; at most {MAX_BATCH_ITEMS} per request")
    rows = []
    for i, row in enumerate(instances):
        if not isinstance(row, list) and math.prod(shape) == 1:
            row = [row]
        numbers: list = []
        _numbers(row, f"{field}[{i}]", numbers)
        got = _depth_shape(row)
        if got != tuple(shape) or len(numbers) != math.prod(shape):
            raise InputError(
                400,
                f"{field}[{i}]: expected shape {list(shape)} ({math.prod(shape)} numbers), got "
                f"{list(got)} ({len(numbers)} numbers)",
            )
        rows.append(numbers)
    return np.asarray(rows, np.float32).reshape(len(rows), *shape)


def rows_from_array(card: ModelCard, x: np.ndarray, what: str = "input") -> np.ndarray:
    """A numeric array of shape (N, *shape) to raw float32 rows, checked like JSON rows are."""
    shape = tuple(card.input_shape)
    try:
        x = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError):
        raise InputError(400, f"{what}: not an array of numbers") from None
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
        raise InputError(400, f"{what}: expected shape [N, {', '.join(map(str, shape))}], got {list(x.shape)}")
    if not 1 <= len(x) <= MAX_BATCH_ITEMS:
        raise InputError(413 if len(x) else 400, f"{what}: {len(x)} examples; 1 to {MAX_BATCH_ITEMS} per request")
    bad = np.argwhere(~np.isfinite(x))
    if len(bad):
        raise InputError(400, f"{what}{list(bad[0])}: NaN and Infinity are not numbers a model can take")
    return x
