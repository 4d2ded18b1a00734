from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from helpers import bare_site_packages, quick


@pytest.fixture(scope="session")
def bare_python(tmp_path_factory) -> Path:
    """A Python with this project's dependencies but not the project: where TorchServe's workers, KServe's container
    and an app embedding the model run. What works there works from the archive's or bundle's own files."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    bare_site_packages(venv, Path(sysconfig.get_paths()["purelib"]))
    python = venv / "bin" / "python"
    probe = subprocess.run([python, "-c", "import torchship"], cwd=venv, capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'torchship'" in probe.stderr, probe.stderr
    return python


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One unpacked copy of the embedded digits for the whole session."""
    from torchship.train.data import prepare_embedded

    root = tmp_path_factory.mktemp("data")
    prepare_embedded(root)
    return root


@pytest.fixture(scope="session")
def convnet_run(tmp_path_factory, data_dir) -> Path:
    """The default preset trained once for every module that needs a real digit model (3 epochs: ~0.95 accuracy,
    margins like a real model's, which int8 needs to agree with the float model)."""
    from torchship.train.fit import train

    run = tmp_path_factory.mktemp("run-convnet")
    train(quick("mnist-convnet", epochs=3), run, data_dir, quiet=True)
    return run


ALL_FORMATS = ("ts", "onnx", "pt2", "int8")


@pytest.fixture(scope="session")
def convnet_export(tmp_path_factory, convnet_run, data_dir):
    """Its export in every format, the pt2 compiled once per session; shared read-only (copy it to damage it)."""
    from torchship.export.formats import Options, export_checkpoint

    out = tmp_path_factory.mktemp("export-convnet")
    return export_checkpoint(convnet_run / "best.pt", out, ALL_FORMATS, options=Options(data_dir=data_dir))
