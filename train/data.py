"""Datasets as whole tensors: read once through torchvision's classes, kept resident on the device."""

from __future__ import annotations

import gzip
import hashlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from torchship.train.mnist5k import EMBEDDED, FILES
from torchship.train.presets import DATASETS


class DataError(Exception):
    """A dataset that cannot be found or read; its message is one line for the user."""


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, 28, 28) for the digit datasets; float32 (N, features) for tensor ones
    labels: torch.Tensor  # int64 (N,) classes; float32 (N, outputs) targets

    def __len__(self) -> int:
        return len(self.labels)


def prepare_embedded(root: Path) -> Path:
    """Unpack the embedded digits into torchvision's raw layout, checking each file's sha256."""
    raw = root / "mnist-5k" / "MNIST" / "raw"
    sums = dict(line.split()[::-1] for line in (EMBEDDED / "SHA256SUMS").read_text().splitlines())
    raw.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        target = raw / name
        if target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == sums[name]:
            continue
        tmp = target.with_suffix(".tmp")
        with gzip.open(EMBEDDED / f"{name}.gz") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        if hashlib.sha256(tmp.read_bytes()).hexdigest() != sums[name]:
            tmp.unlink()
            raise DataError(f"embedded file {name}.gz does not match SHA256SUMS: the checkout is damaged")
        tmp.replace(target)
    return root / "mnist-5k"


# The tutorial's own data: numpy seed 42, 100 points x ~ U(0, 1), y = a + b x + 0.1 N(0, 1), shuffled, 80 / 20.
TUTORIAL_LINE = {"seed": 42, "points": 100, "a": 1.0, "b": 2.0, "noise": 0.1, "train": 80}


def tutorial_line() -> tuple[Split, Split]:
    """(train, validation) exactly as "Understanding PyTorch with an example" draws them (np.random.seed(42); rand,
    randn, shuffle: one RandomState gives the same stream)."""
    c = TUTORIAL_LINE
    rng = np.random.RandomState(c["seed"])
    x = rng.rand(c["points"], 1)
    y = c["a"] + c["b"] * x + c["noise"] * rng.randn(c["points"], 1)
    idx = np.arange(c["points"])
    rng.shuffle(idx)
    train, val = idx[: c["train"]], idx[c["train"] :]

    def split(i) -> Split:
        return Split(torch.from_numpy(x[i]).float(), torch.from_numpy(y[i]).float())

    return split(train), split(val)


def load(name: str, data_dir: Path | str = "data", download: bool = True) -> tuple[Split, Split]:
    """(train, test) for a dataset name; torchvision reads the IDX files, downloading only when allowed."""
    from torchvision import datasets  # heavy (0.5 s over torch), and only the datasets need it

    data_dir = Path(data_dir)
    if name == "mnist-5k":
        root, cls, download = prepare_embedded(data_dir), datasets.MNIST, False
    elif name == "mnist":
        root, cls = data_dir, datasets.MNIST
    elif name == "fashion-mnist":
        root, cls = data_dir, datasets.FashionMNIST
    else:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    try:
        parts = [cls(str(root), train=train, download=download) for train in (True, False)]
    except Exception as e:  # torchvision raises RuntimeError offline, URLError/OSError on failed downloads
        raw = root / cls.__name__ / "raw"
        raise DataError(
            f"{name} not found: put {', '.join(FILES)} (optionally .gz) in {raw}/"
            f"{' or run online to download' if not download else ''} ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    return tuple(Split(p.data, p.targets.long()) for p in parts)  # type: ignore[return-value]


def validation_indices(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices, reproducible from the seed alone."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * fraction))
    return order[n_val:], order[:n_val]


def split_validation(data: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    train, val = validation_indices(len(data), fraction, seed)
    return Split(data.images[train], data.labels[train]), Split(data.images[val], data.labels[val])


def mean_std(images: torch.Tensor) -> tuple[float, float]:
    x = images.double() / 255.0
    return round(x.mean().item(), 4), round(x.std().item(), 4)


def to_tensor(images: torch.Tensor, mean: float, std: float, device: torch.device) -> torch.Tensor:
    """What ToTensor + Normalize do per sample, done once for the whole set on the device."""
    if device.type == "cuda":
        images = images.pin_memory()  # lets the copy below run asynchronously
    x = images.to(device, non_blocking=True).float().div_(255.0).unsqueeze(1)
    return x.sub_(mean).div_(std)


def jitter(n: int, generator: torch.Generator) -> torch.Tensor:
    """Random parameters for augment(), one row per image, uniform in [-1, 1)."""
    return torch.rand(n, 4, generator=generator) * 2 - 1


def augment(x: torch.Tensor, background: float, r: torch.Tensor) -> torch.Tensor:
    """Small random rotations, scalings and shifts of a whole batch at once (one affine_grid call)."""
    angle, scale, shift = r[:, 0] * 0.17, 1 + r[:, 1] * 0.1, r[:, 2:] * 0.1  # ±10°, ±10%, ±1.4 px
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x - background, grid, align_corners=False) + background


def batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled (when a generator is given) batches sliced from resident tensors; no per-sample work."""
    n = len(x)
    if generator is None:
        for i in range(0, n, batch_size):
            yield x[i : i + batch_size], y[i : i + batch_size]
        return
    order = torch.randperm(n, generator=generator).to(x.device)
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        yield x[idx], y[idx]
