"""Classify image files with an exported model, using onnxruntime, numpy and Pillow only (no torch).

python examples/embed_onnx.py exports/mnist-convnet/model.onnx digit1.png digit2.jpg
"""

import json
import sys

from torchship.handlers.model.onnx_model import InputError, load


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: embed_onnx.py MODEL.onnx IMAGE [IMAGE ...]", file=sys.stderr)
        return 2
    try:
        model = load(argv[0], threads=1)  # one intra-op thread: best latency for a small model
    except Exception as e:  # a missing file, or not an ONNX model torchship exported
        print(f"error: cannot load {argv[0]}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    failed = 0
    for path in argv[1:]:
        try:
            print(path, json.dumps(model.predict(path, topk=3)))
        except (InputError, OSError) as e:  # one bad file does not stop the others
            print(f"error: {path}: {getattr(e, 'message', None) or e.strerror or e}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
