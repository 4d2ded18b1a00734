"""Plain helpers the test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from torchship.runtime.card import Architecture, ModelCard
from torchship.train.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]
# The installed console command: unlike `python -m`, it puts no working directory on sys.path, so a test of the CLI
# passes only if the installed package works.
TORCHSHIP = [str(Path(sys.executable).with_name("torchship"))]


def quick(name: str, **kw):
    """A preset cut down to seconds: the real architecture and optimiser, fewer epochs."""
    return dataclasses.replace(get_preset(name), **{"epochs": 2, **kw})


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
        architecture=Architecture("torchship.train.models:ConvNet", {}),
    )
    return ModelCard(**{**base, **kw})


def bare_site_packages(venv: Path, source: Path) -> Path:
    """VENV's site-packages, holding a link to every entry of SOURCE but this project's own (its files, its
    dist-info, an editable install's finder): the dependencies alone, as TorchServe's workers and a container have
    them."""
    import sysconfig

    target = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    target.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if not entry.name.lower().startswith(("torchship", "__editable__", "__pycache__")):
            (target / entry.name).symlink_to(entry)
    return target


def no_torch(directory: Path) -> Path:
    """A folder that, put first on PYTHONPATH, makes `import torch` fail the way a torch-free image does."""
    blocker = directory / "torch"
    blocker.mkdir(parents=True, exist_ok=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch is not installed here')\n")
    return directory


def cli_error(monkeypatch, cwd: Path, *args) -> tuple[int, list[str], str]:
    """The command run by click's own runner in this process (a process each costs ~4-7 s of imports here; the
    installed command runs as a process in test_package): its exit code, its `Error:` lines and all its stderr.
    Anything but click's own exit, which is what prints no traceback, fails the test here."""
    from click.testing import CliRunner

    from torchship.cli import main

    monkeypatch.chdir(cwd)
    r = CliRunner().invoke(main, [str(a) for a in args], prog_name="torchship")
    assert isinstance(r.exception, SystemExit), (r.exception, r.stderr[-2000:])
    return r.exit_code, [line for line in r.stderr.splitlines() if line.startswith("Error:")], r.stderr


def wait_for(condition, timeout: float, what: str, every: float = 0.1):
    """Poll until condition() is truthy and return its value; fail naming what never happened."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(every)


def corrupt_onnx(path: Path) -> None:
    """Add 0.5 to one weight of the largest initializer: the smallest damage the proof must catch."""
    import numpy as np
    import onnx

    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    w = onnx.numpy_helper.to_array(init).copy()
    w.flat[0] += 0.5
    init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    onnx.save(model, str(path))
