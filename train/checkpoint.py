"""Checkpoints that survive a kill at any moment and load with weights_only=True."""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from torchship.handlers.card import CardError, ModelCard, from_legacy
from torchship.train.models import build_builtin


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


FORMAT, VERSION = "torchship-checkpoint", 2  # 1: a dict whose `meta` repeated the card (read, never written)


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of a run: what metrics.json and the curves show."""

    epoch: int
    loss: float
    val_loss: float
    seconds: float = 0.0
    images_per_second: float = 0.0
    lr: float = 0.0
    processes: int = 1
    accuracy: float | None = None  # classifiers only
    val_accuracy: float | None = None

    @classmethod
    def from_dict(cls, d: Mapping) -> EpochRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class Checkpoint:
    """What a run writes after an epoch. The card is the one place the model's facts live; the rest is the state to
    resume from. Saved as plain dicts and tensors (to_dict), so torch.load(weights_only=True) reads it."""

    card: ModelCard
    epoch: int
    model: dict  # the unwrapped model's state dict: export loads it as it is
    optimizer: dict
    scheduler: dict
    history: tuple[EpochRecord, ...]
    rng: dict  # {"torch": ByteTensor, "cuda": ByteTensor}
    world_size: int = 1
    preset: str | None = None  # what --resume checks
    training: Mapping = field(default_factory=dict)  # the preset's hyperparameters and the device: for a reader

    def to_dict(self) -> dict:
        """Also the keys the tutorial's own loading code reads ("Saving (and Loading) Models"): `loss` and `val_loss`,
        the per-epoch losses, beside `epoch` and the two state dicts."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "card": self.card.to_dict(),
            "epoch": self.epoch,
            "model_state_dict": self.model,
            "optimizer_state_dict": self.optimizer,
            "scheduler_state_dict": self.scheduler,
            "history": [asdict(h) for h in self.history],
            "loss": [h.loss for h in self.history],
            "val_loss": [h.val_loss for h in self.history],
            "rng_state": self.rng,
            "world_size": self.world_size,
            "preset": self.preset,
            "training": dict(self.training),
        }

    @classmethod
    def from_dict(cls, d: Mapping, path: Path | str = "checkpoint") -> Checkpoint:
        """This version's checkpoints, and version 1's (a `meta` dict instead of the card, or beside it)."""
        legacy = d.get("format") != FORMAT
        missing = [k for k in ("epoch", "model_state_dict") if k not in d] + (
            ["meta"] if legacy and "card" not in d and "meta" not in d else []
        )
        if missing or not isinstance(d.get("model_state_dict"), Mapping):
            raise CheckpointError(f"{path} is not a torchship checkpoint (it lacks {', '.join(missing) or 'weights'})")
        if not legacy and d.get("version", 0) > VERSION:
            raise CheckpointError(
                f"{path} was written by a newer torchship (checkpoint version {d['version']}): upgrade torchship"
            )
        meta = d.get("meta") if isinstance(d.get("meta"), Mapping) else {}
        try:
            card = ModelCard.from_dict(d["card"]) if "card" in d else from_legacy(meta)
        except CardError as e:
            raise CheckpointError(f"{path}: {e}") from None
        history = d.get("history") or []
        if not isinstance(history, list) or not all(isinstance(h, Mapping) for h in history):
            raise CheckpointError(f"{path}: its history is not a list of epochs")
        return cls(
            card=card,
            epoch=int(d["epoch"]),
            model=dict(d["model_state_dict"]),
            optimizer=d.get("optimizer_state_dict") or {},
            scheduler=d.get("scheduler_state_dict") or {},
            history=tuple(EpochRecord.from_dict(h) for h in history),
            rng=d.get("rng_state") or {},
            world_size=int(d.get("world_size", meta.get("world_size", 1))),
            preset=d.get("preset", meta.get("preset")),
            training=d.get("training") or {k: v for k, v in meta.items() if k in TRAINING_KEYS},
        )


TRAINING_KEYS = ("hparams", "seed", "device", "torch_version")


def load(path: Path | str, preset: str | None = None, map_location: str | torch.device = "cpu") -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip; its directory sits at the very end
        raise CheckpointError(f"{path} is truncated or corrupt (not a complete torch zip archive)")
    try:
        raw = torch.load(path, map_location=map_location, weights_only=True)
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
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path} is not a torchship checkpoint (it holds a {type(raw).__name__})")
    ckpt = Checkpoint.from_dict(raw, path)
    if preset is not None and ckpt.preset != preset:
        raise CheckpointError(f"{path} is a checkpoint of preset {str(ckpt.preset)[:60]!r}, not {preset!r}")
    return ckpt


def model_from_checkpoint(ckpt: Checkpoint) -> torch.nn.Module:
    """Rebuild the eager model a checkpoint describes, in eval mode: our own architectures only, never code a file
    names."""
    arch = ckpt.card.architecture
    try:
        model = build_builtin(arch.spec, arch.kwargs)
        model.load_state_dict(ckpt.model)
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"weights do not fit architecture {arch.spec}: {str(e).splitlines()[0]}") from None
    return model.eval()


def rng_state(device: torch.device) -> dict:
    """The random state a resumed run continues from, saved in every checkpoint."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
