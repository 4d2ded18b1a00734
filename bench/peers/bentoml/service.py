"""The digit model (or the BERT row's text classifier, at /classify_text) as a BentoML 1.4 service (https://docs.bentoml.com/en/latest/build-with-bentoml/services.html,
https://docs.bentoml.com/en/latest/get-started/adaptive-batching.html): a batchable API with adaptive batching.

Requests are multipart forms with one image file; BentoML gathers them into batches of up to 8, each worker on its
own. The model, its preprocessing and its answers are torchship's (torchship_handlers beside this file), ONNX
Runtime with one intra-op thread. Settings come from the environment the bench sets (TORCHSHIP_PEER_*).
"""

import os
from pathlib import Path

import bentoml
import numpy as np
from torchship_handlers.model.onnx_model import load
from torchship_handlers.model.responses import respond

WORKERS = int(os.environ.get("TORCHSHIP_PEER_WORKERS", "2"))
MAX_BATCH = int(os.environ.get("TORCHSHIP_PEER_MAX_BATCH", "8"))
# BentoML has no wait knob: it learns how long a batch takes and answers 503 past max_latency_ms.
MAX_LATENCY_MS = int(os.environ.get("TORCHSHIP_PEER_MAX_LATENCY_MS", "10000"))


@bentoml.service(workers=WORKERS, traffic={"timeout": 30})
class Digits:
    def __init__(self) -> None:
        self.model = load(os.environ["TORCHSHIP_PEER_MODEL"], threads=1)

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH, max_latency_ms=MAX_LATENCY_MS)
    def classify(self, image: list[Path]) -> list[dict]:
        x = np.stack([self.model.prepare(p.read_bytes()) for p in image])
        return respond(self.model.card, self.model.run(x))

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH, max_latency_ms=MAX_LATENCY_MS)
    def classify_text(self, text: list[str]) -> list[dict]:
        """The BERT row: JSON {"text": [one text]}, batched; the runtime's tokenizer and answer."""
        return [{"label": label.decode()} for label in self.model.predict(list(text))["label"]]
