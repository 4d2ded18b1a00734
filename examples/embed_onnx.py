"""Classify image files with an exported model, using onnxruntime, numpy and Pillow only (no torch).

python examples/embed_onnx.py exports/mnist-convnet/model.onnx digit1.png digit2.jpg
"""

import json
import sys

from handlers.onnx_model import load


def main(model_path: str, *images: str) -> None:
    model = load(model_path, threads=1)  # one intra-op thread: best latency for a 6 MFLOP model
    for path, result in zip(images, model.predict(list(images), topk=3)):
        print(path, json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
