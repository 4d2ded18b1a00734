"""The digit model (or the BERT row's text classifier) as a Seldon MLServer custom runtime (https://mlserver.readthedocs.io/en/latest/user-guide/custom.html,
https://mlserver.readthedocs.io/en/latest/user-guide/adaptive-batching.html): an MLModel over the Open Inference
Protocol, with adaptive batching (max_batch_size / max_batch_time in model-settings.json) and parallel workers
(settings.json), both written by the bench next to this file.

MLServer's REST has no binary tensor extension: images arrive base64 in v2 JSON. The model, its preprocessing and
its answers are torchship's (torchship_handlers beside this file), ONNX Runtime with one intra-op thread.
"""

import base64

import numpy as np
from mlserver import MLModel
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput
from torchship_handlers.model.onnx_model import load
from torchship_handlers.model.responses import probabilities


class Digits(MLModel):
    async def load(self) -> bool:
        self.model = load(self.settings.parameters.uri, threads=1)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        items = payload.inputs[0].data.root if hasattr(payload.inputs[0].data, "root") else payload.inputs[0].data
        if self.model.card.named:  # a text model (the BERT row): texts in, the runtime's tokenizer and answer
            texts = [b if isinstance(b, str) else bytes(b).decode() for b in items]
            out = self.model.predict(texts)
            probs, labels = out["probabilities"], [label.decode() for label in out["label"]]
        else:
            blobs = [base64.b64decode(b) if isinstance(b, str) else bytes(b) for b in items]
            x = np.stack([self.model.prepare(b) for b in blobs])
            probs = probabilities(self.model.card, self.model.run(x))
            labels = [self.model.card.labels[i] for i in probs.argmax(1)]
        return InferenceResponse(
            model_name=self.name,
            outputs=[
                ResponseOutput(name="label", datatype="BYTES", shape=[len(labels)], data=labels),
                ResponseOutput(
                    name="probabilities", datatype="FP32", shape=list(probs.shape), data=probs.ravel().tolist()
                ),
            ],
        )
