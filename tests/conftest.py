from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

from helpers import ROOT, TORCHSHIP, bare_site_packages, quick


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


def built_once(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """Under `pytest -n` (make test) each worker has its own session: the first to ask trains or compiles, under a lock
    in the run's shared temp folder, and the others reuse the folder it left complete."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    out = shared / name
    with FileLock(f"{out}.lock"):
        if not (out / ".complete").is_file():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            build(out)
            (out / ".complete").touch()
    return out


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One unpacked copy of the embedded digits for the whole session."""
    from torchship.train.data import prepare_embedded

    return built_once(tmp_path_factory, "data", prepare_embedded)


@pytest.fixture(scope="session")
def convnet_run(tmp_path_factory, data_dir) -> Path:
    """The default preset trained once for every module that needs a real digit model (3 epochs: ~0.95 accuracy,
    margins like a real model's, which int8 needs to agree with the float model)."""
    from torchship.train.fit import train

    return built_once(
        tmp_path_factory, "run-convnet", lambda run: train(quick("mnist-convnet", epochs=3), run, data_dir, quiet=True)
    )


@pytest.fixture(scope="session")
def convnet_export(tmp_path_factory, convnet_run, data_dir):
    """Its export in every format but the pt2 (which takes a minute of g++): shared read-only (copy it to damage it)."""
    from torchship.export.formats import Options, export_checkpoint

    out = built_once(
        tmp_path_factory,
        "export-convnet",
        lambda out: export_checkpoint(
            convnet_run / "best.pt", out, ("ts", "onnx", "int8"), options=Options(data_dir=data_dir)
        ),
    )
    return exported(out)


@pytest.fixture(scope="session")
def convnet_all_formats(tmp_path_factory, convnet_run, convnet_export):
    """The same export plus the pt2, compiled once per run under its own lock, so that the tests which need no pt2
    never wait for the compiler."""
    from torchship.export.formats import export_model
    from torchship.export.user_model import from_checkpoint

    def build(out: Path) -> None:
        shutil.copytree(convnet_export.directory, out, dirs_exist_ok=True)
        export_model(from_checkpoint(convnet_run / "best.pt")[0], convnet_export.card, out, ("pt2",))  # the same card

    return exported(built_once(tmp_path_factory, "export-convnet-all", build))


def named_export(tmp_path_factory, name: str) -> Path:
    """One of tests/named_models.py's models exported with `torchship export --model --signature`, once per run (the
    tabular one serves three test files): the folder holds models.py, the weights, the export and its stdout."""
    from named_models import MODELS, NAMED, export

    def build(out: Path) -> None:
        (out / "models.py").write_text(MODELS)
        (out / "stdout.txt").write_text(export(out, name, *NAMED[name])[1])

    return built_once(tmp_path_factory, f"named-{name}", build)


@pytest.fixture(scope="session")
def named_exports(tmp_path_factory):
    """name -> the folder of that named-input model's shared export (built on first use)."""
    return lambda name: named_export(tmp_path_factory, name)


@pytest.fixture(scope="session")
def shop_export(tmp_path_factory) -> Path:
    """The two-input tabular model with three outputs: its export directory."""
    return named_export(tmp_path_factory, "shop") / "shop"


def exported(out: Path):
    from torchship.export.formats import FORMAT_BY_NAME, Exported, present, read_card

    return Exported(out, read_card(out), {name: out / FORMAT_BY_NAME[name].file for name in present(out)})


@pytest.fixture(scope="session")
def triton_exports(tmp_path_factory):
    """name -> the export folder of one of Triton's example models (tests/triton_models.py), built on first use; the
    export's stdout and stderr beside it."""
    from triton_models import export

    def build(out: Path, name: str) -> None:
        r, _ = export(out, name)
        (out / "export.log").write_text(f"exit {r.returncode}\n{r.stdout}\n{r.stderr}")

    return lambda name: built_once(tmp_path_factory, f"triton-{name}", lambda out: build(out, name)) / name


@pytest.fixture(scope="session")
def text_exports(tmp_path_factory) -> dict:
    """name -> the export folder of each text model (tests/text_models.py), built once: one tokenizer for all three,
    each export's output beside it; an export that fails fails every test that asks for it, with its log."""
    from text_models import TEXT, export_all

    def build(out: Path) -> None:
        r = export_all(out)
        (out / "exports.log").write_text(f"exit {r.returncode}\n{r.stdout}\n{r.stderr}")

    folder = built_once(tmp_path_factory, "text-models", build)
    for name in TEXT:
        assert (folder / name / "equivalence.json").is_file(), (folder / "exports.log").read_text()[-3000:]
    return {name: folder / name for name in TEXT}


@pytest.fixture(scope="session")
def vision_exports(tmp_path_factory) -> dict:
    """detector and segmenter -> their export folders (tests/vision_models.py: trained on synthetic scenes for a
    few seconds, exported as a user would with `torchship export --model FILE:fn`), built once."""
    from vision_models import LABELS, SIZE

    def build(out: Path) -> None:
        log = [
            subprocess.run(
                [sys.executable, str(ROOT / "tests" / "vision_models.py"), str(out)], capture_output=True, text=True
            )
        ]
        for name in ("detector", "segmenter"):
            log.append(
                subprocess.run(
                    [*TORCHSHIP, "export", "--model", f"{ROOT / 'tests' / 'vision_models.py'}:{name}", "--weights",
                     str(out / f"{name}.pt"), "--input-shape", f"3,{SIZE},{SIZE}", "--labels", ",".join(LABELS),
                     "--out", str(out / name)],
                    capture_output=True, text=True, cwd=out,
                )
            )  # fmt: skip
        (out / "exports.log").write_text("\n".join(f"exit {r.returncode}\n{r.stdout}\n{r.stderr}" for r in log))

    folder = built_once(tmp_path_factory, "vision-models", build)
    for name in ("detector", "segmenter"):
        assert (folder / name / "equivalence.json").is_file(), (folder / "exports.log").read_text()[-3000:]
    return {name: folder / name for name in ("detector", "segmenter")}
