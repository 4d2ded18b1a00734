"""The inputs a proof runs and int8 calibrates on: a dataset's real images or rows where the card names one, else
synthetic ones (smooth images and noise; rows drawn over the training range the card records)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from torchship.handlers.card import ModelCard
from torchship.handlers.model import named
from torchship.handlers.model.errors import InputError
from torchship.handlers.model.images import Preprocessor
from torchship.handlers.model.tensors import standardize
from torchship.handlers.signature import Signature
from torchship.train import data

CALIBRATION_IMAGES = 1024  # enough for MinMax ranges to settle (bench/NOTES.md, int8)
CALIBRATION_BYTES = 1 << 26  # at most 64 MB of calibration inputs: 111 images at 3x224x224
MIDDLE = 7  # the proof's length between each dimension's shortest and longest (the "sequence 1, 7, 128")
EXAMPLE_LENGTH = 8  # what export traces with: torch.export specialises lengths 0 and 1
INT_SPREAD = 100  # integer inputs without a declared range are drawn from 0..INT_SPREAD


def normalise(card: ModelCard, pixels: np.ndarray) -> np.ndarray:
    """Pixels in [0, 1], (N, C, H, W), to the model's input."""
    mean = np.asarray(card.mean, np.float32)[None, :, None, None]
    std = np.asarray(card.std, np.float32)[None, :, None, None]
    return ((pixels - mean) / std).astype(np.float32)


def dataset_split(card: ModelCard, data_dir: Path | str, train: bool):
    """The card's dataset split as a (images or rows, labels or targets) pair, or None when it is not on this disk."""
    if card.dataset == "linreg-tutorial" and card.input_shape == (1,):
        split = data.tutorial_line()[0 if train else 1]
        return split.images.numpy(), split.labels.numpy()
    if card.dataset not in data.DATASETS or card.input_shape != (1, 28, 28):
        return None
    try:
        splits = data.load(card.dataset, data_dir, download=False)
    except data.DataError:
        return None
    split = splits[0] if train else splits[1]
    return split.images.numpy()[:, None].astype(np.float32) / 255.0, split.labels.numpy()


def held_out(card: ModelCard, n: int, data_dir: Path | str) -> np.ndarray | None:
    """Real held-out images of the card's dataset, evenly spread (the split is ordered by class); None offline."""
    split = dataset_split(card, data_dir, train=False)
    if split is None:
        return None
    pick = np.linspace(0, len(split[0]) - 1, min(n, len(split[0]))).round().astype(int)
    return split[0][pick]


def synthetic(card: ModelCard, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(uniform noise, smooth natural-looking images), pixels in [0, 1]: half of n each."""
    c, h, w = card.input_shape
    rng = np.random.default_rng(seed)
    noise = rng.uniform(0, 1, size=(n - n // 2, c, h, w)).astype(np.float32)
    smooth = []
    for _ in range(n // 2):
        k = int(rng.integers(2, 9))
        grid = torch.from_numpy(rng.uniform(0, 1, size=(1, c, k, k)).astype(np.float32))
        img = torch.nn.functional.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)[0].numpy()
        yy, xx = np.mgrid[0 : 1 : h * 1j, 0 : 1 : w * 1j]
        ramp = rng.uniform(-0.3, 0.3) * yy + rng.uniform(-0.3, 0.3) * xx
        smooth.append(np.clip(img + ramp, 0, 1).astype(np.float32))
    return noise, np.stack(smooth) if smooth else noise[:0]


def ranged_rows(card: ModelCard, n: int, seed: int = 0) -> np.ndarray:
    """Raw rows drawn uniformly over the training range per entry of the first axis; standard normal around the
    card's mean and std where it records no range."""
    rng = np.random.default_rng(seed)
    shape, first = card.input_shape, card.input_shape[0]
    if card.input_range:
        low = np.asarray([r[0] for r in card.input_range], np.float64)
        high = np.asarray([r[1] for r in card.input_range], np.float64)
    else:
        low = np.asarray(card.mean, np.float64) - 2 * np.asarray(card.std, np.float64)
        high = np.asarray(card.mean, np.float64) + 2 * np.asarray(card.std, np.float64)
    u = rng.uniform(0, 1, size=(n, *shape))
    per_first = (1, first, *[1] * (len(shape) - 1))
    return (low.reshape(per_first) + u * (high - low).reshape(per_first)).astype(np.float32)


def tensor_proof_inputs(card: ModelCard, n: int, data_dir: Path | str) -> tuple[np.ndarray, dict]:
    held = dataset_split(card, data_dir, train=False)
    real = held[0][:n] if held is not None else np.zeros((0, *card.input_shape), np.float32)
    drawn = ranged_rows(card, n - len(real))
    x = standardize(card, np.concatenate([real.astype(np.float32), drawn]))
    return x, {
        "real": int(len(real)),
        "ranged": int(len(drawn)),
        "total": int(len(x)),
        "shape": list(x.shape[1:]),
        "dataset": card.dataset if len(real) else None,
        "range": [list(r) for r in card.input_range],
    }


def proof_inputs(card: ModelCard, n: int, data_dir: Path | str = "data") -> tuple[np.ndarray, dict]:
    """Normalised model inputs and what they are: real held-out images or rows where available, else synthetic."""
    if not card.image:
        return tensor_proof_inputs(card, n, data_dir)
    real = held_out(card, n * 4 // 5, data_dir)
    if real is not None:
        noise, _ = synthetic(card, 2 * (n - len(real)))
        pixels, kinds = np.concatenate([real, noise[: n - len(real)]]), {"real": len(real), "noise": n - len(real)}
    else:
        noise, smooth = synthetic(card, n)
        pixels, kinds = np.concatenate([smooth, noise]), {"real": 0, "smooth": len(smooth), "noise": len(noise)}
    x = normalise(card, pixels)
    return x, {
        **kinds,
        "total": int(len(x)),
        "shape": list(x.shape[1:]),
        "dataset": card.dataset if kinds["real"] else None,
    }


def calibration_images(
    card: ModelCard, data_dir: Path | str, directory: Path | str | None = None, n: int = CALIBRATION_IMAGES
) -> tuple[np.ndarray, str]:
    """Model inputs to calibrate int8 on, never held-out ones: your images, the dataset's training split, or
    synthetic ones; and a line saying which."""
    n = min(n, max(32, CALIBRATION_BYTES // (4 * int(np.prod(card.input_shape)))))
    if not card.image:
        split = dataset_split(card, data_dir, train=True)
        if split is not None:
            return standardize(card, split[0][:n]), f"{min(n, len(split[0]))} {card.dataset} training rows"
        return standardize(card, ranged_rows(card, n, seed=1)), f"{n} rows drawn over the training range"
    if directory is not None:
        prep = Preprocessor(card)
        found, arrays = sorted(p for p in Path(directory).rglob("*") if p.is_file()), []
        for path in found[: n * 2]:
            try:
                arrays.append(prep.from_item(path))
            except (InputError, OSError):
                continue
            if len(arrays) >= n:
                break
        if not arrays:
            raise ValueError(f"no readable images under {directory} to calibrate on")
        return np.stack(arrays), f"{len(arrays)} images from {directory}"
    split = dataset_split(card, data_dir, train=True)
    if split is not None:
        order = torch.randperm(len(split[0]), generator=torch.Generator().manual_seed(0))[:n].numpy()
        return normalise(card, split[0][order]), f"{len(order)} {card.dataset} training images"
    _, smooth = synthetic(card, 2 * n, seed=1)
    return normalise(card, smooth), f"{len(smooth)} synthetic smooth images (no dataset, no --calibration)"


# named inputs, drawn from the signature: what export traces with and what the proof runs


def lengths(sig: Signature) -> list[dict[str, int]]:
    """The proof's cases: the k-th holds every named dimension at its k-th length (shortest, MIDDLE, longest)."""
    values = {d: sorted({low, min(max(low, MIDDLE), high), high}) for d, (low, high) in sig.dims.items()}
    cases = max((len(v) for v in values.values()), default=1)
    return [{d: v[min(k, len(v) - 1)] for d, v in values.items()} for k in range(cases)]


def example_dims(sig: Signature) -> dict[str, int]:
    return {d: min(max(low, EXAMPLE_LENGTH), high) for d, (low, high) in sig.dims.items()}


def draw(sig: Signature, n: int, dims: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """n examples of every input at these lengths, each value drawn from the input's declared range."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in sig.inputs:
        shape = (n, *(d if isinstance(d, int) else dims[d] for d in t.shape[1:]))
        dtype = named.NUMPY[t.datatype]
        if t.mask:  # 1s then 0s, at least one 1, along the last axis (a padded tokenizer's mask)
            kept = rng.integers(1, shape[-1] + 1, (*shape[:-1], 1))
            x = np.arange(shape[-1]) < kept
        elif t.datatype == "BOOL":
            x = rng.integers(0, 2, shape).astype(bool)
        elif np.dtype(dtype).kind in "iu":
            low, high = (int(t.range[0]), int(t.range[1])) if t.range else (0, INT_SPREAD)
            x = rng.integers(low, high + 1, shape)
        elif t.range:
            x = rng.uniform(t.range[0], t.range[1], shape)
        else:
            x = rng.standard_normal(shape)
        feeds[t.name] = np.ascontiguousarray(x.astype(dtype))
    return feeds
