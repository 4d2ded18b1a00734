"""TorchServe handler for torchship exports: TorchScript or ONNX, batch-aware, per-request errors."""

from __future__ import annotations

import base64
import json
import logging
import os

import numpy as np
from ts.torch_handler.base_handler import BaseHandler

try:  # the repository layout
    from handlers import onnx_model, preprocess
    from handlers.request import Batch, decode_row
except ImportError:  # pragma: no cover - the flat layout of a TorchServe archive
    import onnx_model
    import preprocess
    from request import Batch, decode_row

logger = logging.getLogger(__name__)


class ImageHandler(BaseHandler):
    def initialize(self, context) -> None:
        properties = context.system_properties
        model_dir = properties.get("model_dir")
        config = (getattr(context, "model_yaml_config", None) or {}).get("handler", {})
        self.threads = int(config.get("threads", os.environ.get("TORCHSHIP_THREADS", 1)))
        # TorchServe's worker logs every batch's arrival and its PredictionTime gauge at INFO, through a pipe
        # the frontend reads and parses: a measurable share of a lone request on 2 cores (bench/NOTES.md).
        worker_level = str(config.get("worker_log_level", "WARNING")).upper()
        with open(os.path.join(model_dir, "meta.json")) as f:
            self.meta = json.load(f)
        onnx_path = os.path.join(model_dir, "model.onnx")
        if os.path.isfile(onnx_path):
            self.backend = "onnx"
            self.onnx = onnx_model.load(onnx_path, threads=self.threads)
        else:
            import torch

            torch.set_num_threads(self.threads)  # one per worker: workers must not fight over the cores
            self.backend = "torchscript"
            self.model = torch.jit.load(os.path.join(model_dir, "model.ts.pt"), map_location="cpu").eval()
        self.max_pixels = int(config.get("max_pixels", preprocess.MAX_PIXELS))
        self.table = preprocess.normaliser(self.meta["mean"], self.meta["std"])
        self.initialized = True
        logger.info(
            "torchship %s loaded with %s backend, %d thread(s); worker log level %s",
            self.meta["preset"], self.backend, self.threads, worker_level,
        )  # fmt: skip
        logging.getLogger().setLevel(worker_level)

    def topk_header(self, idx: int) -> str | None:
        """TorchServe 0.12 drops a POST's query string, so `?topk=` cannot reach us: X-TopK carries it."""
        context = getattr(self, "context", None)
        if context is None:
            return None
        try:
            found = context.get_all_request_header(idx) or {}
        except (AttributeError, IndexError, TypeError):
            return None
        return next((v for k, v in found.items() if isinstance(k, str) and k.lower() == "x-topk"), None)

    def preprocess(self, data: list[dict]) -> Batch:
        batch = Batch(None, size=len(data))
        arrays = []
        for i, row in enumerate(data):
            try:
                req = decode_row(row, len(self.meta["labels"]), self.topk_header(i))
                m = self.meta
                arrays.append(preprocess.prepare_bytes(req.image, m["preprocess"], m["mean"], m["std"], self.table,
                                                       self.max_pixels))  # fmt: skip
                batch.rows.append(i)
                batch.topk.append(req.topk)
            except preprocess.InputError as e:
                batch.errors[i] = e
            except Exception as e:  # an image Pillow opened but could not convert: still this row's fault
                batch.errors[i] = preprocess.InputError(422, f"could not process the image: {e}")
        if arrays:
            batch.inputs = np.stack(arrays)
        return batch

    def inference(self, batch: Batch) -> np.ndarray | None:
        """One forward pass for every good image TorchServe batched together."""
        if batch.inputs is None:
            return None
        if self.backend == "onnx":
            return self.onnx.run(batch.inputs)
        import torch

        with torch.inference_mode():
            return self.model(torch.from_numpy(batch.inputs)).numpy()

    def postprocess(self, batch: Batch, outputs: np.ndarray | None) -> list[str]:
        responses: list[str] = [""] * batch.size
        for i, e in batch.errors.items():
            responses[i] = json.dumps({"error": e.message, "status": e.status})
        probs = preprocess.softmax(outputs) if self.meta["task"] == "classify" and outputs is not None else None
        for j, i in enumerate(batch.rows):
            if probs is None:
                png = preprocess.to_png(outputs[j], self.meta["mean"], self.meta["std"])
                body = {"image_png_base64": base64.b64encode(png).decode("ascii")}
            else:
                body = preprocess.top_k(probs[j], self.meta["labels"], batch.topk[j])
            responses[i] = json.dumps(body)
        return responses

    def handle(self, data: list[dict], context) -> list[str]:
        self.context = context
        batch = self.preprocess(data)
        responses = self.postprocess(batch, self.inference(batch))
        for i in range(batch.size):
            context.set_response_content_type(i, "application/json")
        for i, e in batch.errors.items():
            context.set_response_status(e.status, e.message, i)
        return responses
