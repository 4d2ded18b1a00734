"""The digit model (or the BERT row's text classifier, its input `text`) on NVIDIA Triton through PyTriton (https://triton-inference-server.github.io/pytriton/latest/
binding_models/, .../binding_configuration/): a bound inference function, two instances, Triton's dynamic batching.

Requests are Open Inference Protocol calls with the binary tensor extension (raw image bytes, as Triton takes them).
The model, its preprocessing and its answers are torchship's (torchship_handlers beside this file), ONNX Runtime with
one intra-op thread per instance.
"""

import argparse

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig
from torchship_handlers.model.onnx_model import load
from torchship_handlers.model.responses import probabilities


def instance(model_path: str):
    model = load(model_path, threads=1)

    @batch
    def infer(images: np.ndarray):
        x = np.stack([model.prepare(bytes(row[0])) for row in images])
        probs = probabilities(model.card, model.run(x))
        labels = np.array([[model.card.labels[i].encode()] for i in probs.argmax(1)], dtype=object)
        return {"label": labels, "probabilities": probs}

    @batch
    def infer_text(text: np.ndarray):  # the BERT row: texts in, the runtime's tokenizer and answer
        out = model.predict([bytes(row[0]).decode() for row in text])
        return {"label": out["label"].reshape(-1, 1), "probabilities": out["probabilities"]}

    return (infer_text, "text") if model.card.named else (infer, "images")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--grpc_port", type=int, required=True)
    ap.add_argument("--metrics_port", type=int, required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max_batch", type=int, default=8)
    ap.add_argument("--max_batch_delay_ms", type=float, default=1)
    args = ap.parse_args()
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_verbose=0,
    )
    # PyTriton 0.7 guards Triton's statistics and repository APIs with a token of its own; perf_analyzer reads the
    # statistics, and this server listens on loopback for the bench alone: no guarded endpoints
    instances = [instance(args.model) for _ in range(args.workers)]  # (function, its input's name)
    with Triton(config=config, security_config=TritonSecurityConfig(restricted_endpoints=[])) as triton:
        triton.bind(
            model_name="mnist",
            infer_func=[fn for fn, _ in instances],
            inputs=[Tensor(name=instances[0][1], dtype=bytes, shape=(1,))],
            outputs=[
                Tensor(name="label", dtype=bytes, shape=(1,)),
                Tensor(name="probabilities", dtype=np.float32, shape=(-1,)),
            ],
            config=ModelConfig(
                max_batch_size=args.max_batch,
                batcher=DynamicBatcher(max_queue_delay_microseconds=int(args.max_batch_delay_ms * 1000)),
            ),
        )
        triton.serve()
