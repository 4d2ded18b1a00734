"""Checkpoints that survive a kill at any moment and load with weights_only=True."""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

from torchship.runtime.card import CardError, ModelCard, from_legacy
from torchship.train.presets import PRESETS

REQUIRED = ("epoch", "model_state_dict", "meta")


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is one line for the user."""


def save_atomic(obj: dict, path: Path | str) -> None:
    """Temp file in the same directory, fsync, os.replace, fsync the directory: old or new, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temps(directory: Path) -> None:
    """Temp files left by a killed writer are garbage: the real file was never replaced by them."""
    for tmp in directory.glob(".*.pt.*.tmp"):
        tmp.unlink(missing_ok=True)


def load(path: Path | str, preset: str | None = None, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip; its directory sits at the very end
        raise CheckpointError(f"{path} is truncated or corrupt (not a complete torch zip archive)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Weights only" in str(e):
            raise CheckpointError(
                f"refusing to load {path}: it pickles Python objects that weights_only=True rejects "
                "(it could run code); torchship checkpoints hold only tensors and plain types"
            ) from None
        raise CheckpointError(f"{path} is not a torchship checkpoint (not a torch file)") from None
    except Exception as e:  # torch.load fails in many ways on damaged files: zip, EOF, unpickler index errors
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is truncated or corrupt ({first})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED) or not isinstance(ckpt["meta"], dict):
        raise CheckpointError(f"{path} is not a torchship checkpoint (expected keys: {', '.join(REQUIRED)})")
    found = ckpt["meta"].get("preset")
    if found not in PRESETS:
        raise CheckpointError(f"{path} names preset {str(found)[:60]!r}, which torchship does not know "
                              f"({', '.join(PRESETS)})")  # fmt: skip
    if preset is not None and found != preset:
        raise CheckpointError(f"{path} is a checkpoint of preset {found!r}, not {preset!r}")
    card_of(ckpt, path)  # refuse a checkpoint whose model facts do not validate, whatever the caller wants next
    return ckpt


def card_of(ckpt: dict, path: Path | str = "checkpoint") -> ModelCard:
    """The checkpoint's model card; checkpoints from before the card carry the same facts in `meta`."""
    try:
        return ModelCard.from_dict(ckpt["card"]) if "card" in ckpt else from_legacy(ckpt["meta"])
    except CardError as e:
        raise CheckpointError(f"{path}: {e}") from None


def model_from_checkpoint(ckpt: dict) -> torch.nn.Module:
    """Rebuild the eager model a checkpoint describes, in eval mode."""
    from torchship.train.models import build_builtin

    arch = card_of(ckpt).architecture
    try:
        model = build_builtin(arch.spec, arch.kwargs)
        model.load_state_dict(ckpt["model_state_dict"])
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"weights do not fit architecture {arch.spec}: {str(e).splitlines()[0]}") from None
    return model.eval()
