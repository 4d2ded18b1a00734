"""The one place that decides where training runs and which process may write files."""

from __future__ import annotations

import os

import torch


def pick_device(name: str = "auto") -> torch.device:
    """`auto` prefers CUDA, then Apple's MPS, then CPU; under torchrun each rank takes its LOCAL_RANK GPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def is_main_process() -> bool:
    """Under torchrun only rank 0 writes checkpoints, metrics and plots."""
    return int(os.environ.get("RANK", "0")) == 0
