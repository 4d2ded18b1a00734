"""Bad input on the command line: a clear one-line error and a non-zero exit, never a traceback."""

import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from helpers import ROOT, cli_error

CASES = [  # (name, arguments, words the error must hold); {export} and {file} are filled in per test
    ("no cuda", ["train", "--device", "cuda"], "no usable CUDA GPU"),
    ("no second cuda", ["train", "--device", "cuda:1"], "no usable CUDA GPU"),
    ("no mps", ["train", "--device", "mps"], "MPS is not available"),
    ("gpu is not a device", ["train", "--device", "gpu"], "unknown device 'gpu'"),
    ("negative lr", ["train", "--lr", "-5"], "positive number"),
    ("nan lr", ["train", "--lr", "nan"], "positive number"),
    ("zero hidden", ["train", "--preset", "mnist-mlp", "--hidden", "0"], "layer sizes"),
    ("hidden on a convnet", ["train", "--hidden", "8"], "MLP presets"),
    ("unknown preset", ["train", "--preset", "resnet"], "resnet"),
    ("no checkpoint", ["export", "missing.pt"], "not found"),
    ("nothing to export", ["export"], "either a torchship CHECKPOINT"),
    ("verify nothing", ["verify", "missing-dir"], "missing"),
    ("archive nothing", ["archive", "missing-dir"], "meta.json"),
    ("too many workers", ["archive", "{export}", "--workers", "100"], "at most"),
    ("format not exported", ["archive", "{onnx_only}", "--backend", "pt2"], "model.pt2 not found"),
    ("path as name", ["archive", "{export}", "--name", "../x"], "safe name"),
    ("no archive to serve", ["serve", "start", "--model", "nope", "--model-store", "{empty}"], "nope.mar not found"),
    ("no key", ["serve", "key", "--state-dir", "{empty}"], "no inference key"),
    ("concurrency text", ["loadtest", "--concurrency", "abc"], "client counts"),
    ("concurrency gap", ["loadtest", "--concurrency", "1,,4"], "client counts"),
    ("concurrency zero", ["loadtest", "--concurrency", "0"], "client counts"),
    ("concurrency negative", ["loadtest", "--concurrency", "-1"], "client counts"),
    ("loadtest nothing running", ["loadtest", "--state-dir", "{empty}"], "make serve"),
    ("loadtest no images", ["loadtest", "--images", "{empty}", "--state-dir", "{empty}"], "make serve"),
]


@pytest.mark.parametrize("name,args,words", CASES, ids=[c[0] for c in CASES])
def test_bad_command_lines_get_one_line_errors(name, args, words, convnet_export, tmp_path, monkeypatch):
    empty, onnx_only = tmp_path / "empty", tmp_path / "onnx-only"
    empty.mkdir()
    onnx_only.mkdir()
    for f in ("meta.json", "model.onnx"):
        shutil.copy(convnet_export.directory / f, onnx_only / f)
    filled = [a.format(export=convnet_export.directory, empty=empty, onnx_only=onnx_only) for a in args]
    code, errors, _ = cli_error(monkeypatch, tmp_path, *filled)
    assert code != 0 and len(errors) == 1 and words in errors[0], (code, errors)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "exports").exists()  # nothing half-written


def test_the_embedding_example_explains_itself(convnet_export, tmp_path):
    example = [sys.executable, str(ROOT / "examples" / "embed_onnx.py")]
    env = {**os.environ}
    (tmp_path / "notes.txt").write_text("not an image")
    Image.new("L", (28, 28), 0).save(tmp_path / "blank.png")
    digit = tmp_path / "digit.png"
    from torchship.serve.samples import held_out_digits, png

    digit.write_bytes(png(held_out_digits()[0][0]))
    usage = subprocess.run(example, capture_output=True, text=True, env=env)
    assert usage.returncode == 2 and usage.stderr.startswith("usage:")
    missing = subprocess.run(
        [*example, str(tmp_path / "nope.onnx"), str(digit)], capture_output=True, text=True, env=env
    )
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "nope.onnx" in missing.stderr
    mixed = subprocess.run(
        [*example, str(convnet_export.onnx), str(tmp_path / "notes.txt"), str(digit), str(tmp_path / "blank.png")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert mixed.returncode == 1 and "Traceback" not in mixed.stderr
    assert [line.split(": ")[1] for line in mixed.stderr.splitlines()] == [
        str(tmp_path / "notes.txt"),
        str(tmp_path / "blank.png"),
    ]
    assert mixed.stdout.startswith(str(digit)) and '"label"' in mixed.stdout  # the good file still answered
