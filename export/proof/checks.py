"""What every proof shares: its batch sizes, the exact formats of an export as functions of a batch, the eager model
rebuilt from the weights the export was made from, and one check of a backend's output against the reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from torchship.export.formats import present, read_card, sha256
from torchship.export.proof.report import Check, VerificationError
from torchship.export.proof.tolerance import compare
from torchship.export.user_model import ModelLoadError, rebuild
from torchship.handlers.card import CARD_FILE, CardError, ModelCard
from torchship.handlers.formats import FORMAT_BY_NAME
from torchship.handlers.model import runners
from torchship.train.checkpoint import CheckpointError

BATCH_SIZES = (1, 2, 7, 64)  # the last is capped at the number of proof images


def backends(export_dir: Path, model: torch.nn.Module, formats: list[str], threads: int = 0) -> dict:
    """Every exact format present, as a function of a numpy batch (named inputs: of a dict); eager float32 first."""
    card = read_card(export_dir)
    eager = runners.named_torch_runner(model, card.signature) if card.named else runners.torch_runner(model)
    fns = {"eager-fp32": eager}
    for name in formats:
        fmt = FORMAT_BY_NAME[name]
        if fmt.exact:
            threads = threads or torch.get_num_threads()
            fns[fmt.backend] = runners.load(export_dir, fmt.backend, threads=threads, card=card).run
    return fns


def batched(fn, x: np.ndarray, size: int = 256) -> np.ndarray:
    return np.concatenate([fn(np.ascontiguousarray(x[i : i + size])) for i in range(0, len(x), size)])


def run_batched(fn, x: np.ndarray, batch_size: int, out_shape: tuple) -> tuple[np.ndarray, bool, bool]:
    outs, shape_ok, dtype_ok = [], True, True
    for i in range(0, len(x), batch_size):
        chunk = x[i : i + batch_size]
        out = fn(np.ascontiguousarray(chunk))
        shape_ok &= out.shape == (len(chunk), *out_shape)
        dtype_ok &= out.dtype == np.float32
        outs.append(out.reshape(len(chunk), *out_shape) if out.size == len(chunk) * np.prod(out_shape) else out)
    try:
        return np.concatenate(outs), shape_ok, dtype_ok
    except ValueError:
        return np.full((len(x), *out_shape), np.nan, np.float32), False, dtype_ok


MIN_PIXEL_AGREEMENT = 0.999  # a segmenter's class per pixel, ties left out


def check(
    backend: str, bs: int, got, shape_ok, dtype_ok, ref, *, atol, rtol, classify: bool, pixels: bool = False
) -> Check:
    """PIXELS: a segmenter's logits (N, classes, H, W), whose class per pixel must also agree where the reference's
    best two classes are further apart than the tolerance (nearer: a tie, counted and left out)."""
    stats = compare(got, ref, atol, rtol)
    top1 = float((got.argmax(1) == ref.argmax(1)).mean()) if classify else None
    ties = None
    if pixels and shape_ok:
        top2 = np.sort(ref, axis=1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > 2 * (atol + rtol * np.abs(top2[:, 1]))
        ties = int((~clear).sum())
        top1 = float((got.argmax(1) == ref.argmax(1))[clear].mean()) if clear.any() else 1.0
    passed = shape_ok and dtype_ok and stats["failures"] == 0 and (not pixels or top1 >= MIN_PIXEL_AGREEMENT)
    return Check(backend, bs, atol, rtol, passed, shape_ok, dtype_ok, top1_agreement=top1, ties=ties, **stats)


def load_for_proof(export_dir: Path, source: Path | str | None) -> tuple[ModelCard, torch.nn.Module, list[str]]:
    if not (export_dir / CARD_FILE).is_file():
        raise VerificationError(f"{export_dir / CARD_FILE} is missing: run `torchship export` first")
    try:
        card = read_card(export_dir)
    except CardError as e:
        raise VerificationError(f"{export_dir}: {e}") from None
    formats = present(export_dir)
    if not any(FORMAT_BY_NAME[f].exact for f in formats):
        raise VerificationError(f"{export_dir} holds no exported model: run `torchship export` first")
    source = Path(source or card.provenance.source or "")
    if not source.is_file():
        raise VerificationError(
            f"the weights this export was made from are not at {source or '(unknown)'}: pass --checkpoint PATH"
        )
    if card.provenance.source_sha256 and sha256(source) != card.provenance.source_sha256:
        raise VerificationError(f"{source} changed since this export was made (sha256 differs): export again")
    try:
        model = rebuild(card, source)
    except (ModelLoadError, CheckpointError) as e:
        raise VerificationError(str(e)) from None
    return card, model, formats


def read_card_or_none(export_dir: Path) -> ModelCard | None:
    try:
        return read_card(export_dir)
    except CardError:
        return None
