"""An export on disk: the files each format writes, the proof beside them, and the digest that ties a proof to the
file it proved; stdlib only, read by export (writing), verify (proving) and both runtimes (serving)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

PROOF_FILE = "equivalence.json"  # what `torchship export` and `torchship verify` write: the proof and what it proved


@dataclass(frozen=True)
class Format:
    """One exported form of the model: its --formats name, its serving backend and its file."""

    name: str
    backend: str
    file: str
    exact: bool = True  # False: an approximation (int8), judged by accuracy rather than element-wise error


FORMATS = (
    Format("ts", "torchscript", "model.ts.pt"),
    Format("onnx", "onnx", "model.onnx"),
    Format("pt2", "pt2", "model.pt2"),
    Format("int8", "onnx-int8", "model.int8.onnx", exact=False),
)
FORMAT_BY_NAME = {f.name: f for f in FORMATS}
DEFAULT_FORMATS = ("ts", "onnx")  # what `torchship export` writes unless told: seconds to build (README)
FORMAT_BY_BACKEND = {f.backend: f for f in FORMATS}


def digest(path: Path | str) -> str:
    """A file's sha256: the proof records one for each file it proved, and a runtime serves a file only while its
    digest is still the one recorded."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
