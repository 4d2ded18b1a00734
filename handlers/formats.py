"""An export on disk: the files each format writes, the proof beside them, and the digest that ties a proof to the
file it proved; stdlib only, read by export (writing), verify (proving) and both runtimes (serving)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .card import CARD_FILE, ModelCard

PROOF_FILE = "equivalence.json"  # what `torchship export` and `torchship verify` write: the proof and what it proved
STEP_FILE = "process.py"  # a model's own pre/post-processing step (--process), copied beside the model


@dataclass(frozen=True)
class Format:
    """One exported form of the model: its --formats name, its serving backend and its file."""

    name: str
    backend: str
    file: str
    exact: bool = True  # False: an approximation (int8), judged by accuracy rather than element-wise error
    # ONNX Runtime sets threads per loaded model (a session), torch per process; the torch-free runtime runs only the
    # former
    onnxruntime: bool = False


FORMATS = (
    Format("ts", "torchscript", "model.ts.pt"),
    Format("onnx", "onnx", "model.onnx", onnxruntime=True),
    Format("pt2", "pt2", "model.pt2"),
    Format("int8", "onnx-int8", "model.int8.onnx", exact=False, onnxruntime=True),
)
FORMAT_BY_NAME = {f.name: f for f in FORMATS}
DEFAULT_FORMATS = ("ts", "onnx")  # what `torchship export` writes unless told: seconds to build (README)
FORMAT_BY_BACKEND = {f.backend: f for f in FORMATS}
ORT_BACKENDS = tuple(f.backend for f in FORMATS if f.onnxruntime)  # what a torch-free server can run


def served_files(card: ModelCard, backend: str) -> tuple[str, ...]:
    """What serving one backend of an export needs, wherever it is shipped (archive, bundle, server folder)."""
    sig = card.signature if card.named else None
    own = (sig.process.file,) if sig and sig.process else (sig.text.tokenizer,) if sig and sig.text else ()
    return (CARD_FILE, FORMAT_BY_BACKEND[backend].file, *own)


def digest(path: Path | str) -> str:
    """A file's sha256: the proof records one for each file it proved, and a runtime serves a file only while its
    digest is still the one recorded."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
