"""Embed an exported model in any app with onnxruntime alone: no torch import, anywhere.

from torchship.handlers.onnx_model import load
model = load("exports/mnist-convnet/model.onnx")
model.predict("digit.png")  # -> {"label": "7", "probability": 0.99, "topk": [...]}
load("exports/linreg/model.onnx").predict(np.array([[0.5]]))  # -> [2.0]: a tensor model takes rows of numbers
load("exports/bert/model.onnx").predict({"input_ids": ids, "attention_mask": mask})  # -> {"logits": array}
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..card import ONNX_METADATA_KEY, CardError, ModelCard
from ..signature import TEXT_INPUT
from . import named, steps
from .errors import InputError
from .images import Preprocessor, framed, sizes_of
from .responses import DEFAULT_TOPK, respond
from .runners import session_options
from .steps import Steps
from .tensors import rows_from_array, rows_from_instances, standardize
from .vision import detect_runner


@dataclass
class OnnxModel:
    session: ort.InferenceSession
    card: ModelCard
    preprocessor: Preprocessor = field(repr=False, default=None)  # type: ignore[assignment]
    steps: Steps | None = field(repr=False, default=None)  # a named-input model's signature and its own step

    def __post_init__(self):
        if self.preprocessor is None:
            self.preprocessor = Preprocessor(self.card)
        if self.steps is None and self.card.named:
            self.steps = Steps(self.card.signature)
        self.input_name = self.session.get_inputs()[0].name
        if self.card.task == "detect":
            self._detect = detect_runner(self._feed, self.card.thresholds["detections"])

    @property
    def labels(self) -> tuple[str, ...]:
        return self.card.labels

    def prepare(self, item) -> np.ndarray:
        """Any supported input to one normalised (C, H, W) array, exactly as the servers do."""
        return self.preprocessor.from_item(item)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Raw model output for a normalised (N, C, H, W) float32 batch."""
        if self.card.task == "detect":  # one image a pass, packed (N, K, 6): model/vision.py
            return self._detect(batch)
        return self._feed(batch)[0]

    def _feed(self, x: np.ndarray) -> list:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})

    def predict(self, images, topk: int = DEFAULT_TOPK):
        """One image (path, bytes, PIL image, array) gives one result; a list gives a list, in one forward pass.
        A text model takes a string (its outputs by name, one row each) or a list (each output a batch).
        A tensor model takes rows instead: one example (a number, or an array of the card's shape) gives one result;
        an array (N, *shape) or a list of rows gives a list.

        Raises images.InputError (with .status and .message) for input that is not a usable image or row.
        """
        if self.card.named and self.card.signature.text and isinstance(images, (str, bytes, list, tuple)):
            single = isinstance(images, (str, bytes))  # a text model: one text, or a list of them
            out = self.predict_named({TEXT_INPUT: np.array([images] if single else list(images), dtype=object)})
            return {k: v[0] for k, v in out.items()} if single else out
        if self.card.named:
            return self.predict_named(images)
        if not self.card.image:
            return self.predict_rows(images, topk)
        single = not isinstance(images, (list, tuple)) and not (isinstance(images, np.ndarray) and images.ndim == 4)
        items = [images] if single else list(images)
        if not items:
            return []
        if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
            raise ValueError(f"topk must be a positive integer, got {topk!r}")
        x = framed([self.prepare(i) for i in items])
        results = respond(self.card, self.run(x), [topk] * len(items), sizes_of(x))
        return results[0] if single else results

    def predict_named(self, inputs: dict) -> dict[str, np.ndarray]:
        """Named inputs, each a batch (N, ...) checked against the card's signature, to every output by name."""
        if not isinstance(inputs, dict):
            raise InputError(
                400, f"this model takes named inputs: a dict of {[t.name for t in self.card.signature.served_inputs]}"
            )
        given = {}
        for name, value in inputs.items():
            spec = next((t for t in self.card.signature.served_inputs if t.name == name), None)
            strings = spec is not None and spec.datatype == "BYTES"
            x = np.asarray(value, object if strings else None)
            datatype = "BYTES" if strings else named.DATATYPE_OF.get(x.dtype, str(x.dtype))
            if spec is not None and not strings and x.dtype.kind == np.dtype(named.NUMPY[spec.datatype]).kind:
                datatype = spec.datatype  # an int32 array for an INT64 input is the same numbers
            given[name] = (datatype, x.shape, x.reshape(-1))
        rows = self.steps.check(given)
        names = [o.name for o in self.session.get_outputs()]
        return self.steps.outputs(dict(zip(names, self.session.run(None, rows.arrays))), rows)

    def predict_rows(self, rows, topk: int = DEFAULT_TOPK):
        shape = self.card.input_shape
        one = np.ndim(rows) == len(shape) or (np.ndim(rows) == 0 and math.prod(shape) == 1)
        if isinstance(rows, (list, tuple)) and not rows:
            return []
        raw = np.asarray(rows, dtype=np.float32) if not isinstance(rows, (list, tuple)) else None
        if raw is None:
            x = rows_from_instances(self.card, [r.tolist() if isinstance(r, np.ndarray) else r for r in rows], "rows")
        else:
            x = rows_from_array(self.card, raw.reshape(1, *shape) if one else raw, "rows")
        results = respond(self.card, self.run(standardize(self.card, x)), [topk] * len(x))
        return results[0] if one and raw is not None else results


def card_of(session: ort.InferenceSession, path: Path) -> ModelCard:
    props = session.get_modelmeta().custom_metadata_map
    if ONNX_METADATA_KEY not in props:
        raise CardError("(card)", f"{path} carries no torchship model card: export it with `torchship export`")
    return ModelCard.from_json(props[ONNX_METADATA_KEY])


def load(
    path: str | os.PathLike,
    threads: int = 1,
    optimization: str = "all",
    providers: list[str] | None = None,
    spinning: bool = False,
    max_pixels: int = 0,
) -> OnnxModel:
    """Load model.onnx; the card (normalisation, labels, preprocessing) comes from the model's own metadata."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    session = ort.InferenceSession(
        str(path), session_options(threads, optimization, spinning), providers=providers or ["CPUExecutionProvider"]
    )
    card = card_of(session, path)
    return OnnxModel(session, card, Preprocessor(card, max_pixels), steps.load(card.signature, path.parent))


__all__ = ["InputError", "OnnxModel", "load", "session_options"]
