"""What ships: one import name, and the wheel installed into a clean environment running the whole way through."""

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from helpers import ROOT, bare_site_packages


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel .` of a copy of what git tracks (and the vendored page files, which a clone gets from `make
    install`), as a user builds it; no build isolation: the test must not depend on the network."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
    vendored = [str(p.relative_to(ROOT)) for p in (ROOT / "serve" / "web" / "vendor").glob("*")]
    for name in tracked + vendored:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "--wheel-dir",
            str(out),
            str(source),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return next(out.glob("torchship-*.whl"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory, wheel) -> Path:
    """A new venv holding the dependencies (linked, not reinstalled) and the wheel, installed as pip installs it."""
    venv = tmp_path_factory.mktemp("clean") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    bare_site_packages(venv, Path(sysconfig.get_paths()["purelib"]))
    python = venv / "bin" / "python"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--quiet", str(wheel)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return venv


def test_the_wheels_only_top_level_name_is_torchship(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["torchship"]
    assert {n.split("/")[0] for n in names if not n.startswith("torchship-")} == {"torchship"}
    modules = {n for n in names if n.endswith(".py")}
    folders = {
        "torchship": "torchship",
        "train": "torchship/train",
        "export": "torchship/export",
        "serve": "torchship/serve",
        "handlers": "torchship/handlers",
    }
    source = {
        f"{to}/{p.relative_to(ROOT / src).as_posix()}"
        for src, to in folders.items()
        for p in (ROOT / src).rglob("*.py")
    }
    assert len(source) > 80 and source == modules, sorted(source ^ modules)  # every module of every folder, nested too
    assert "torchship/serve/web/vendor/ort-wasm-simd-threaded.wasm" in names  # the page's onnxruntime-web


def test_bare_names_do_not_import_and_torchship_does(installed, tmp_path):
    python = installed / "bin" / "python"
    for bare in ("train", "export", "serve", "handlers"):
        r = subprocess.run([python, "-c", f"import {bare}"], capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode != 0 and f"No module named '{bare}'" in r.stderr
    code = "import torchship.train, torchship.handlers.card as c; print(c.__file__)"
    r = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith(str(installed)), r.stderr  # the wheel's copy, not the checkout


def test_the_installed_command_trains_exports_archives_and_writes_the_page(installed, tmp_path, data_dir):
    def torchship(*args):
        r = subprocess.run(
            [installed / "bin" / "torchship", *map(str, args)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=600,
        )
        assert r.returncode == 0, (args, r.stderr[-3000:])
        return r

    assert "train" in torchship("--help").stdout
    torchship("train", "--preset", "mnist-mlp50", "--epochs", "1", "--quiet", "--data-dir", data_dir, "--out", "run")
    proof = torchship("export", "run/best.pt", "--out", "exp", "--data-dir", data_dir)
    assert (
        "all checks pass" in proof.stdout and json.loads((tmp_path / "exp" / "equivalence.json").read_text())["passed"]
    )
    torchship("archive", "exp", "--model-store", "store")
    names = zipfile.ZipFile(tmp_path / "store" / "mnist-mlp50.mar").namelist()
    assert "torchship_handler.py" in names and "torchship_handlers/torchserve/handler.py" in names
    torchship("page", "exp", "--out", "page")
    assert (tmp_path / "page" / "ort" / "ort-wasm-simd-threaded.wasm").stat().st_size > 1_000_000
