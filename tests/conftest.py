from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from handlers.card import Architecture, ModelCard
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


@pytest.fixture(scope="session")
def convnet_run(tmp_path_factory, data_dir) -> Path:
    """The default preset trained once for every module that needs a real digit model (3 epochs: ~0.95 accuracy,
    margins like a real model's, which int8 needs to agree with the float model)."""
    from train.fit import train

    run = tmp_path_factory.mktemp("run-convnet")
    train(quick("mnist-convnet", epochs=3), run, data_dir, quiet=True)
    return run


ALL_FORMATS = ("ts", "onnx", "pt2", "int8")


@pytest.fixture(scope="session")
def convnet_export(tmp_path_factory, convnet_run, data_dir):
    """Its export in every format, the pt2 compiled once per session; shared read-only (copy it to damage it)."""
    from export.formats import Options, export_checkpoint

    out = tmp_path_factory.mktemp("export-convnet")
    return export_checkpoint(convnet_run / "best.pt", out, ALL_FORMATS, options=Options(data_dir=data_dir))


def card(**kw) -> ModelCard:
    """A valid card for tests, changed where a test needs it."""
    base = dict(
        name="digits",
        task="classify",
        input_shape=(1, 28, 28),
        mean=(0.1302,),
        std=(0.3069,),
        labels=tuple(str(i) for i in range(10)),
        preprocess="mnist-digit",
        output_kind="log-probabilities",
        architecture=Architecture("train.models:ConvNet", {}),
    )
    return ModelCard(**{**base, **kw})
