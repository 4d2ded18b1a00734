"""TorchServe handler for torchship exports: any format the archive carries, batch-aware, per-request errors."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
from ts.torch_handler.base_handler import BaseHandler

try:  # the repository layout
    from handlers import runtime
    from handlers.card import ModelCard
    from handlers.images import InputError, Preprocessor
    from handlers.request import Batch, decode_row
    from handlers.responses import respond
except ImportError:  # pragma: no cover - the flat layout of a TorchServe archive
    import runtime
    from card import ModelCard
    from images import InputError, Preprocessor
    from request import Batch, decode_row
    from responses import respond

logger = logging.getLogger(__name__)


class ImageHandler(BaseHandler):
    def initialize(self, context) -> None:
        model_dir = context.system_properties.get("model_dir")
        config = (getattr(context, "model_yaml_config", None) or {}).get("handler", {})
        threads = int(config.get("threads", os.environ.get("TORCHSHIP_THREADS", 1)))
        # TorchServe's worker logs every batch's arrival and its PredictionTime gauge at INFO, through a pipe
        # the frontend reads and parses: a measurable share of a lone request on 2 cores (bench/NOTES.md).
        worker_level = str(config.get("worker_log_level", "WARNING")).upper()
        self.card = ModelCard.load(model_dir)
        self.runner = runtime.load(model_dir, threads=threads)
        self.backend = self.runner.backend
        self.preprocessor = Preprocessor(self.card, int(config.get("max_pixels", 0)))
        self.context = context
        self.initialized = True
        logger.info(
            "torchship %s loaded with %s backend, %d thread(s), max %d pixels; worker log level %s",
            self.card.name, self.backend, threads, self.preprocessor.max_pixels, worker_level,
        )  # fmt: skip
        logging.getLogger().setLevel(worker_level)

    def header(self, idx: int, name: str) -> str | None:
        """A request header, whatever its case (TorchServe 0.12 drops a POST's query string: X-TopK carries topk)."""
        try:
            found = self.context.get_all_request_header(idx) or {}
        except (AttributeError, IndexError, TypeError, KeyError):
            return None
        value = next((v for k, v in found.items() if isinstance(k, str) and k.lower() == name), None)
        return value.decode("latin-1") if isinstance(value, (bytes, bytearray)) else value

    def preprocess(self, data: list[dict]) -> Batch:
        batch = Batch(len(data))
        arrays = []
        for i, row in enumerate(data):
            try:
                req = decode_row(row if isinstance(row, dict) else {"body": row}, self.card.classes,
                                 self.header(i, "x-topk"), self.header(i, "content-type"))  # fmt: skip
                arrays.append(self.preprocessor.from_bytes(req.image))
                batch.rows.append(i)
                batch.topk.append(req.topk)
            except InputError as e:
                batch.errors[i] = e
            except MemoryError:
                batch.errors[i] = InputError(413, "image too large to process")
            except Exception as e:  # an image Pillow opened but could not convert: still this row's fault
                batch.errors[i] = InputError(422, f"could not process the image: {str(e)[:200]}")
        if arrays:
            batch.inputs = np.stack(arrays)
        return batch

    def inference(self, data: Batch, *args, **kwargs) -> Batch:
        """One forward pass for every good image TorchServe batched together."""
        if data.inputs is not None:
            data.outputs = self.runner.run(data.inputs)
        return data

    def postprocess(self, data: Batch) -> list[str]:
        responses = [""] * data.size
        for i, e in data.errors.items():
            responses[i] = json.dumps({"error": e.message, "status": e.status})
        if data.outputs is not None:
            for i, body in zip(data.rows, respond(self.card, data.outputs, data.topk)):
                responses[i] = json.dumps(body)
        return responses

    def handle(self, data: list[dict], context) -> list[str]:
        self.context = context
        batch = self.inference(self.preprocess(data))
        responses = self.postprocess(batch)
        for i in range(batch.size):
            context.set_response_content_type(i, "application/json")
        for i, e in batch.errors.items():
            context.set_response_status(e.status, e.message, i)
        return responses
