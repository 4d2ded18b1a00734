"""The torch-free runtime as it ships inside every archive, deploy bundle and peer set-up: the whole package folder.

It ships under its own top-level name, so it never shadows (and is never shadowed by) an installed torchship, and
its relative imports make it work wherever the folder lands; no list of modules is kept by hand.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torchship.handlers

RUNTIME_DIR = Path(torchship.handlers.__file__).resolve().parent
SHIPPED_NAME = "torchship_handlers"
TORCHSERVE_ENTRY = "torchship_handler.py"  # what --handler names inside an archive
TORCHSERVE_ENTRY_CODE = f'''"""TorchServe's --handler: the torchship runtime package beside this file serves it."""

from {SHIPPED_NAME}.torchserve.handler import ModelHandler


class Handler(ModelHandler):
    """TorchServe instantiates the one class its handler module defines."""
'''


def copy_runtime(dest: Path | str) -> Path:
    """DEST/torchship_handlers: every module the runtime package holds now."""
    target = Path(dest) / SHIPPED_NAME
    shutil.copytree(RUNTIME_DIR, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
    return target


def stage_torchserve_handler(dest: Path | str) -> Path:
    """The runtime package plus the entry module TorchServe imports, ready for torch-model-archiver's --extra-files."""
    copy_runtime(dest)
    entry = Path(dest) / TORCHSERVE_ENTRY
    entry.write_text(TORCHSERVE_ENTRY_CODE)
    return entry
