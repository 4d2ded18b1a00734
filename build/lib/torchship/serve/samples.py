"""Real digits from the embedded test set as the files clients send; shared by the load test and the curl demo."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
from PIL import Image

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


def write_sample(path: Path | str, index: int = 0) -> tuple[Path, int]:
    images, labels = held_out_digits()
    path = Path(path)
    path.write_bytes(png(on_paper(images[index])))
    return path, int(labels[index])
