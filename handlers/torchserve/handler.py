"""TorchServe handler for torchship exports: any format the archive carries, batch-aware, per-request errors."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
from ts.torch_handler.base_handler import BaseHandler

from ..card import ModelCard
from ..model import named, runners, steps
from ..model.errors import InputError
from ..model.images import Preprocessor, framed, sizes_of, with_sizes
from ..model.mapped import FOLDER
from ..model.responses import answers, batch_outputs
from ..model.tensors import rows_from_instances, standardize
from ..protocol import model_io, v2
from ..protocol.v1 import instances
from ..signature import TEXT_INPUT
from .request import Batch, Part, decode_row

logger = logging.getLogger(__name__)


class ModelHandler(BaseHandler):
    def initialize(self, context) -> None:
        model_dir = context.system_properties.get("model_dir")
        config = (getattr(context, "model_yaml_config", None) or {}).get("handler", {})
        threads = int(config.get("threads", os.environ.get("TORCHSHIP_THREADS", 1)))
        # TorchServe's worker logs every batch's arrival and its PredictionTime gauge at INFO, through a pipe
        # the frontend reads and parses: a measurable share of a lone request on 2 cores (bench/NOTES.md).
        worker_level = str(config.get("worker_log_level") or logging.getLevelName(logging.getLogger().level)).upper()
        self.card = ModelCard.load(model_dir)
        # a large ONNX model optimized once into the archive's unpacked folder, which every worker of the model loads
        # from: the workers map one copy of its weights instead of holding one each (model/mapped.py, lever 84)
        mapped_dir = None if config.get("copy_weights") else Path(model_dir) / FOLDER
        self.runner = runners.load(model_dir, threads=threads, card=self.card, mapped_dir=mapped_dir)
        self.backend = self.runner.backend
        self.preprocessor = Preprocessor(self.card, int(config.get("max_pixels", 0)))
        self.steps = steps.load(self.card.signature, model_dir)  # a named-input model's own step, if it has one
        self.context = context
        self.model_name = (context.manifest or {}).get("model", {}).get("modelName", self.card.name)
        self.initialized = True
        logger.info(
            "torchship %s loaded with %s backend, %d thread(s), max %d pixels; worker log level %s",
            self.card.name,
            self.backend,
            threads,
            self.preprocessor.max_pixels,
            worker_level,
        )
        logging.getLogger().setLevel(worker_level)

    def header(self, idx: int, name: str) -> str | None:
        """A request header, whatever its case (TorchServe 0.12 drops a POST's query string: X-TopK carries topk)."""
        try:
            found = self.context.get_all_request_header(idx) or {}
        except (AttributeError, IndexError, TypeError, KeyError):
            return None
        value = next((v for k, v in found.items() if isinstance(k, str) and k.lower() == name), None)
        return value.decode("latin-1") if isinstance(value, (bytes, bytearray)) else value

    def request(self, i: int, row) -> tuple[np.ndarray, dict]:
        """One request's images or rows, normalised, and how to answer it; raises InputError or ProtocolError."""
        row = row if isinstance(row, dict) else {"body": row}
        body, length = row.get("body", row.get("data")), self.header(i, v2.HEADER_LENGTH)
        plain = (self.header(i, "content-type") or "").split(";")[0].strip().lower() == "text/plain"
        if self.card.named and self.card.signature.text and plain:  # TorchServe's text_classifier: the body is the text
            text = body if isinstance(body, (bytes, bytearray)) else str(body).encode()
            return self.named_row({TEXT_INPUT: bytes(text)}), {"named": True}
        if self.card.named and length is None and isinstance(body, (bytes, bytearray)):
            try:
                body = json.loads(body)
            except (ValueError, RecursionError):
                raise InputError(400, f"the body is not JSON: {self.NAMED_HOW}") from None
        if self.card.named and isinstance(body, dict) and isinstance(body.get("inputs"), dict):
            return self.named_row(body["inputs"]), {"named": True}
        if length is not None or (isinstance(body, dict) and "inputs" in body):  # the Open Inference Protocol
            header, tensors = v2.parse_http(body, int(length) if length and length.isdigit() else None)
            return model_io.model_inputs(self.card, self.preprocessor, tensors, steps=self.steps), {"v2": header}
        if self.card.named:
            raise InputError(400, self.NAMED_HOW)
        if not self.card.image:  # KServe v1 / TF Serving JSON: {"instances": [[...], ...]}
            return standardize(self.card, rows_from_instances(self.card, instances(body))), {"v1": True}
        req = decode_row(row, self.card.classes, self.header(i, "x-topk"), self.header(i, "content-type"))
        return framed([self.preprocessor.from_bytes(req.image)]), {"topk": req.topk}

    NAMED_HOW = 'send {"inputs": {"NAME": [...], ...}} (one example) or a v2 request {"inputs": [{...}, ...]}'

    def named_row(self, inputs: dict) -> named.Rows:
        """TorchServe's JSON for a named-input model: {"inputs": {"input_ids": [...], ...}}, one example a request."""
        types = {t.name: t.datatype for t in self.card.signature.served_inputs}
        given = {}
        for name, value in inputs.items():
            strings = types.get(name) == "BYTES"
            ok = (list, str, bytes) if strings else (list, int, float, bool)
            x = np.asarray(value, object if strings else None) if isinstance(value, ok) else None
            if x is None or (x.dtype == object and not strings):
                what = "strings" if strings else "numbers"
                raise InputError(400, f"input '{str(name)[:64]}': expected a (nested) list of {what}")
            given[str(name)[:64]] = (types.get(name, "?"), (1, *x.shape), x.reshape(-1))
        return self.steps.check(given)

    def preprocess(self, data: list[dict]) -> Batch:
        batch, arrays, n = Batch(len(data)), [], 0
        for i, row in enumerate(data):
            try:
                x, how = self.request(i, row)
                arrays.append(x)
                batch.parts.append(Part(i, n, n + len(x), **how))
                n += len(x)
            except InputError as e:
                batch.errors[i] = e
            except v2.ProtocolError as e:
                batch.errors[i] = InputError(e.status, str(e))
            except MemoryError:
                batch.errors[i] = InputError(413, "image too large to process")
            except Exception as e:  # an image Pillow opened but could not convert: still this row's fault
                batch.errors[i] = InputError(422, f"could not process the image: {str(e)[:200]}")
        if arrays:
            batch.inputs = arrays if self.card.named else framed(arrays)
        return batch

    def inference(self, data: Batch, *args, **kwargs) -> Batch:
        """One forward pass for every good image TorchServe batched together."""
        if data.inputs is not None and self.card.named:
            data.outputs = named.run_together(self.card.signature, self.runner.run, data.inputs)
        elif data.inputs is not None:
            data.outputs = batch_outputs(self.card, self.runner.run(data.inputs))
        return data

    def postprocess(self, data: Batch) -> list[str]:
        responses = [""] * data.size
        for k, part in enumerate(data.parts):
            try:
                responses[part.index] = json.dumps(self.answer(data, k, part))
            except InputError as e:  # a model's own step that failed on this request alone (model/steps.py)
                data.errors[part.index] = e
            except Exception as e:
                logger.exception("request %d of the batch could not be answered", part.index)
                data.errors[part.index] = InputError(500, f"could not answer: {type(e).__name__}")
        for i, e in data.errors.items():
            responses[i] = json.dumps({"error": e.message, "status": e.status})
        return responses

    def answer(self, data: Batch, k: int, part: Part) -> dict:
        """The body of the batch's K-th good request."""
        out = data.outputs[k] if self.card.named else data.outputs[part.start : part.stop]
        if part.named:
            answer = self.steps.outputs(out, data.inputs[k])
            return {"outputs": {name: v2.json_values(y[0]) for name, y in answer.items()}}
        sizes = None if self.card.named else sizes_of(data.inputs)[part.start : part.stop]
        if part.v2 is not None:
            # a named request's rows; an image batch's part, with its images' own sizes (boxes, masks in their pixels)
            rows = data.inputs[k] if self.card.named else with_sizes(data.inputs[part.start : part.stop], sizes)
            return v2.response_json(self.model_name, part.v2, model_io.model_outputs(self.card, out, self.steps, rows))
        if part.v1:
            return {"predictions": answers(self.card, out, [part.topk] * len(out), sizes)}
        return answers(self.card, out, [part.topk], sizes)[0]

    def handle(self, data: list[dict], context) -> list[str]:
        self.context = context
        batch = self.inference(self.preprocess(data))
        responses = self.postprocess(batch)
        for i in range(batch.size):
            context.set_response_content_type(i, "application/json")
        for i, e in batch.errors.items():
            context.set_response_status(e.status, e.message, i)
        return responses
