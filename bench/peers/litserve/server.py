"""The digit model (or the BERT row's text classifier: v2 JSON bodies) on LitServe (https://lightning.ai/docs/litserve/api-reference/litapi,
https://lightning.ai/docs/litserve/features/batching): decode / batch / predict / unbatch / encode.

Requests are multipart forms (LitServe parses JSON or forms), one image each; the model, its preprocessing and its
answers are torchship's own (torchship_handlers beside this file), ONNX Runtime with one intra-op thread.
"""

import argparse

import litserve as ls
import numpy as np
from torchship_handlers.model.onnx_model import load
from torchship_handlers.model.responses import respond


class DigitAPI(ls.LitAPI):
    def __init__(self, model_path: str, **batching):
        super().__init__(**batching)
        self.model_path = model_path

    def setup(self, device):
        self.model = load(self.model_path, threads=1)

    def decode_request(self, request):
        if self.model.card.named:  # the BERT row: one text, sent as v2 JSON's `text` input
            return request["inputs"][0]["data"][0]
        return self.model.prepare(request["image"].file.read())

    def batch(self, inputs):
        return inputs if self.model.card.named else np.stack(inputs)

    def predict(self, x):
        if self.model.card.named:
            out = self.model.predict(list(x))
            return [{"label": label.decode()} for label in out["label"]]
        return respond(self.model.card, self.model.run(x))

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        return output


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max_batch", type=int, default=8)
    ap.add_argument("--max_batch_delay_ms", type=float, default=1)
    args = ap.parse_args()
    api = DigitAPI(args.model, max_batch_size=args.max_batch, batch_timeout=args.max_batch_delay_ms / 1000)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers, timeout=30)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, generate_client_file=False)
