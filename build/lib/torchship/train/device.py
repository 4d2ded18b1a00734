"""The one place that decides where training runs (train/distributed.py decides which process writes files)."""

from __future__ import annotations

import os

import torch


class DeviceError(Exception):
    """A device this machine does not have; one line for the user."""


def mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def pick_device(name: str = "auto") -> torch.device:
    """`auto` prefers CUDA, then Apple's MPS, then CPU; under torchrun each rank takes its LOCAL_RANK GPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("mps") if mps_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{name!r}: this machine has no usable CUDA GPU; use --device cpu (or auto)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"{name!r}: this machine has {count} CUDA GPU(s), numbered 0..{count - 1}")
    elif device.type == "mps" and not mps_available():
        raise DeviceError(f"{name!r}: Apple's MPS is not available here; use --device cpu (or auto)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"{name!r}: torchship trains on cpu, cuda or mps")
    return device
