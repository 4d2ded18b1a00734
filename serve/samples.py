"""Real digits from the embedded test set as the files clients send; shared by the load test and the curl demo."""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from torchship.handlers.card import ModelCard
from torchship.handlers.model import steps
from torchship.handlers.protocol import v2
from torchship.train.mnist5k import EMBEDDED


def held_out_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,000 held-out embedded digits (uint8, N x 28 x 28) and their labels; no torch needed."""
    images = np.frombuffer(gzip.open(EMBEDDED / "t10k-images-idx3-ubyte.gz").read(), np.uint8, offset=16)
    labels = np.frombuffer(gzip.open(EMBEDDED / "t10k-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    return images.reshape(-1, 28, 28), labels.astype(np.int64)


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def on_paper(pixels: np.ndarray, size: int = 160, offset: tuple[int, int] = (30, 50)) -> np.ndarray:
    """An MNIST digit as a user would photograph it: dark ink on white paper, bigger, off centre."""
    big = np.asarray(Image.fromarray(pixels).resize((84, 84), Image.Resampling.BICUBIC))
    page = np.zeros((size, size), np.uint8)
    page[offset[0] : offset[0] + 84, offset[1] : offset[1] + 84] = big
    return 255 - page


@dataclass(frozen=True)
class Sample:
    """A request body on disk for the "try it" curl line that `serve start` prints: what the model takes."""

    path: Path
    what: str
    json: bool  # {"instances": ...} for a tensor model, {"inputs": {...}} for named inputs; else an image file
    v2: Path | None = None  # named inputs: the same example as a v2 infer request, for the OIP server


def write_sample(
    folder: Path | str, card: ModelCard | None = None, index: int = 0, *, export_dir: Path | str | None = None
) -> Sample:
    """A photographed-style held-out digit for an image model; for a tensor model one row at the middle of the range
        its card records, or at its mean in raw units where it records none (the mean the card standardizes with: a row
        like the data's, never zeros far outside it). A model with its own step: the first row of its examples(), read
    from EXPORT_DIR."""
    folder = Path(folder)
    if card is None or card.image:
        images, labels = held_out_digits()
        path = folder / "sample-digit.png"
        path.write_bytes(png(on_paper(images[index])))
        return Sample(path, f"a photographed-style {int(labels[index])}", json=False)
    if card.named:
        return named_sample(folder, card, export_dir)
    shape = card.input_shape
    middle = np.array([(lo + hi) / 2 for lo, hi in card.input_range] or card.mean, np.float64)
    row = np.broadcast_to(middle.reshape(-1, *[1] * (len(shape) - 1)), shape).round(4).tolist()
    path = folder / "sample-row.json"
    path.write_text(json.dumps({"instances": [row]}))
    return Sample(path, f"one row, {json.dumps(row)[:60]}", json=True)


def step_example(card: ModelCard, export_dir: Path | str | None) -> dict:
    """Name -> (datatype, shape, JSON data) of the first row of a step's examples(); {} where there is none.
    EXPORT_DIR: the export, or a folder of exports (NAME/ below it)."""
    sig = card.signature
    folder = Path(export_dir or ".")
    folder = folder if (folder / sig.process.file).is_file() else folder / card.name
    try:
        found = steps.load(sig, folder).examples if export_dir else None
        request = found()[0] if found else {}
    except Exception:  # the user's code: the printed request falls back to the signature's own
        return {}
    types = {t.name: t.datatype for t in sig.served_inputs}
    return {
        k: (
            types.get(k, "?"),
            list(np.shape(v)[1:]),
            v2.json_values(np.asarray(v, object if types.get(k) == "BYTES" else None)[0]),
        )
        for k, v in request.items()
    }


def named_sample(folder: Path, card: ModelCard, export_dir: Path | str | None = None) -> Sample:
    """One example of every input at a short length (8, within each dimension's range): a mask all 1s, others at the
    middle of their range, or 0; or the first of a step's own examples."""
    sig = card.signature
    inputs = step_example(card, export_dir) if sig.process else {}
    for t in () if inputs else sig.served_inputs:
        shape = [d if isinstance(d, int) else min(max(sig.dims[d][0], 8), sig.dims[d][1]) for d in t.shape[1:]]
        value = 1 if t.mask else (t.range[0] + t.range[1]) / 2 if t.range else 0
        value = int(value) if t.datatype.startswith("INT") or t.datatype == "BOOL" else value
        inputs[t.name] = (t.datatype, shape, np.full(shape, value).tolist())
    path, v2 = folder / "sample-inputs.json", folder / "sample-v2.json"
    path.write_text(json.dumps({"inputs": {n: data for n, (_, _, data) in inputs.items()}}))
    v2.write_text(
        json.dumps(
            {
                "inputs": [
                    {"name": n, "datatype": d, "shape": [1, *shape], "data": data}
                    for n, (d, shape, data) in inputs.items()
                ]
            }
        )
    )
    return Sample(path, f"one example of {', '.join(inputs)}", json=True, v2=v2)
