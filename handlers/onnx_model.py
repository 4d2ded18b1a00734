"""Embed an exported model in any app with onnxruntime alone: no torch import, anywhere.

from handlers.onnx_model import load
model = load("exports/mnist-convnet/model.onnx")
model.predict("digit.png")  # -> {"label": "7", "probability": 0.99, "topk": [...]}
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import onnxruntime as ort

try:  # inside a TorchServe archive the modules sit flat in the model directory
    from handlers import preprocess
except ImportError:  # pragma: no cover - exercised by the TorchServe worker
    import preprocess

META_KEY = "torchship"
OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass
class OnnxModel:
    session: ort.InferenceSession
    meta: dict
    input_name: str

    @property
    def labels(self) -> list[str]:
        return self.meta["labels"]

    @cached_property
    def table(self) -> np.ndarray:
        return preprocess.normaliser(self.meta["mean"], self.meta["std"])

    def prepare(self, item) -> np.ndarray:
        """Any supported input to one normalised (1, 28, 28) array, exactly as the TorchServe handler does."""
        m = self.meta
        if isinstance(item, (bytes, bytearray)):
            return preprocess.prepare_bytes(bytes(item), m["preprocess"], m["mean"], m["std"], self.table)
        img = preprocess.as_image(item)
        return preprocess.prepare(img, m["preprocess"], m["mean"], m["std"])

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Raw model output for a normalised (N, 1, 28, 28) float32 batch."""
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def predict(self, images, topk: int = 3):
        """One image (path, bytes, PIL image, 2-D array) gives one result; a list gives a list, in one forward pass."""
        single = not isinstance(images, (list, tuple)) and not (isinstance(images, np.ndarray) and images.ndim == 4)
        items = [images] if single else list(images)
        out = self.run(np.stack([self.prepare(i) for i in items]))
        results = [self.result(o, topk) for o in out]
        return results[0] if single else results

    def result(self, output: np.ndarray, topk: int = 3) -> dict:
        if self.meta["task"] == "reconstruct":
            png = preprocess.to_png(output, self.meta["mean"], self.meta["std"])
            return {"image_png_base64": base64.b64encode(png).decode("ascii")}
        return preprocess.top_k(preprocess.softmax(output), self.labels, topk)


def session_options(threads: int = 1, optimization: str = "all", spinning: bool = False) -> ort.SessionOptions:
    """Small models want one thread per worker (no fork/join cost, no fight over cores) and full graph fusion."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = OPTIMIZATION[optimization]
    if not spinning:  # idle threads would otherwise busy-wait and steal cores from other workers
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def load(
    path: str | os.PathLike,
    threads: int = 1,
    optimization: str = "all",
    providers: list[str] | None = None,
    spinning: bool = False,
) -> OnnxModel:
    """Load model.onnx; normalisation, labels and preprocessing mode come from its own metadata."""
    path = Path(path)
    session = ort.InferenceSession(
        str(path), session_options(threads, optimization, spinning), providers=providers or ["CPUExecutionProvider"]
    )
    props = session.get_modelmeta().custom_metadata_map
    if META_KEY not in props:
        raise ValueError(f"{path} carries no torchship metadata: export it with `torchship export`")
    return OnnxModel(session, json.loads(props[META_KEY]), session.get_inputs()[0].name)
