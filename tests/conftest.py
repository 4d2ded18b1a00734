from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from train.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]
TORCHSHIP = [sys.executable, "-m", "torchship.cli"]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One unpacked copy of the embedded digits for the whole session."""
    from train.data import prepare_embedded

    root = tmp_path_factory.mktemp("data")
    prepare_embedded(root)
    return root


def quick(name: str, **kw):
    """A preset cut down to seconds: the real architecture and optimiser, fewer epochs."""
    return dataclasses.replace(get_preset(name), **{"epochs": 2, **kw})
