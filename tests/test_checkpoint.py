import os
import signal
import subprocess
import time

import pytest
import torch

from torchship.train import checkpoint
from torchship.train.checkpoint import CheckpointError
from torchship.train.fit import train

from helpers import TORCHSHIP, cli_error, quick


class Evil:
    """Not a tensor, not a plain type: weights_only=True must refuse to unpickle it."""


@pytest.fixture(scope="module")
def good(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("good")
    train(quick("mnist-mlp50", epochs=1), out, data_dir, quiet=True)
    return out / "last.pt"


def test_good_checkpoint_loads(good):
    ckpt = checkpoint.load(good, preset="mnist-mlp50")
    model = checkpoint.model_from_checkpoint(ckpt)
    assert not model.training
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def bad_files(tmp_path, good):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(4096))
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}}, foreign)
    evil = tmp_path / "evil.pt"
    torch.save({"epoch": 1, "model_state_dict": {}, "meta": {"preset": "mnist-mlp50"}, "x": Evil()}, evil)
    return {
        "missing": (tmp_path / "nope.pt", "not found"),
        "truncated": (truncated, "truncated or corrupt"),
        "garbage": (garbage, "corrupt|not a torchship checkpoint"),
        "foreign": (foreign, "not a torchship checkpoint"),
        "evil": (evil, "weights_only"),
        "other preset": (good, "preset 'mnist-mlp50', not 'mnist-convnet'"),
    }


def test_each_bad_checkpoint_is_a_clear_error(tmp_path, good):
    for path, message in bad_files(tmp_path, good).values():
        with pytest.raises(CheckpointError, match=message):
            checkpoint.load(path, preset="mnist-convnet")


def test_cli_reports_a_bad_checkpoint_in_one_line(tmp_path, good, data_dir, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(good.read_bytes()[:1000])
    code, errors, stderr = cli_error(
        monkeypatch,
        tmp_path,
        "train",
        "--preset",
        "mnist-mlp50",
        "--resume",
        "--quiet",
        "--out",
        run,
        "--data-dir",
        data_dir,
    )
    assert code == 1 and stderr.strip().count("\n") == 0 and "truncated or corrupt" in errors[0], stderr


def test_kill_9_during_training_leaves_a_loadable_last_checkpoint(tmp_path, data_dir):
    """SIGKILL at several moments of a run that writes a checkpoint every few hundred milliseconds."""
    out = tmp_path / "run"
    cmd = [
        *TORCHSHIP,
        "train",
        "--preset",
        "mnist-mlp",
        "--epochs",
        "500",
        "--quiet",
        "--out",
        str(out),
        "--data-dir",
        str(data_dir),
    ]
    epochs = []
    for delay in (0.05, 0.23, 0.41):
        proc = subprocess.Popen(cmd + (["--resume"] if epochs else []), cwd=tmp_path)
        deadline = time.monotonic() + 120
        start = epochs[-1] if epochs else 0
        while time.monotonic() < deadline:
            if (out / "last.pt").exists() and checkpoint.load(out / "last.pt").epoch > start + 1:
                break
            time.sleep(0.05)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = checkpoint.load(out / "last.pt", preset="mnist-mlp")
        assert ckpt.epoch > start
        epochs.append(ckpt.epoch)
    assert epochs == sorted(epochs)


def version1(ckpt: dict) -> None:
    """Rewrite a checkpoint as torchship wrote them before the typed record (stop 15): the card beside a `meta` dict
    that repeated the training facts, loss lists beside the history, and the card naming `train.models:...`."""
    for k in ("format", "version", "world_size", "preset", "training"):
        ckpt.pop(k)
    ckpt["loss"] = [h["loss"] for h in ckpt["history"]]
    ckpt["val_loss"] = [h["val_loss"] for h in ckpt["history"]]
    ckpt["meta"] = {
        "preset": "mnist-mlp50",
        "hparams": {},
        "seed": 1,
        "device": "cpu",
        "world_size": 1,
        "torch_version": "2.13.0",
    }
    ckpt["card"]["architecture"]["spec"] = "train.models:MLP"
    ckpt["card"]["schema_version"] = 1
    for k in ("input_kind", "output_names", "units", "input_range"):
        ckpt["card"].pop(k)


def legacy(ckpt: dict) -> None:
    """Further back: no card at all, the model's facts in `meta` (stop 7)."""
    version1(ckpt)
    card = ckpt.pop("card")
    ckpt["meta"].update(
        arch="mlp",
        arch_kwargs=card["architecture"]["kwargs"],
        input_shape=card["input_shape"],
        mean=card["mean"][0],
        std=card["std"][0],
        labels=card["labels"],
        task=card["task"],
        output_kind=card["output_kind"],
        preprocess=card["preprocess"],
        dataset=card["dataset"],
        metrics=card["metrics"],
    )


TAMPERED = {
    "newer format": (lambda c: c.update(version=99), "newer torchship"),
    "history not epochs": (lambda c: c.update(history="x"), "history"),
    "code as architecture": (lambda c: c["card"]["architecture"].update(spec="os:system"), "not a torchship arch"),
    "missing card field": (lambda c: c["card"].pop("labels"), "'labels'"),
    "path as name": (lambda c: c["card"].update(name="../../x"), "safe name"),
    "legacy unknown arch": (lambda c: (legacy(c), c["meta"].update(arch="resnet")), "'arch'"),
    "legacy missing key": (lambda c: (legacy(c), c["meta"].pop("labels")), "'labels'"),
}


@pytest.mark.parametrize("name", list(TAMPERED))
def test_untrusted_checkpoint_metadata_is_a_one_line_error_that_writes_nothing(name, tmp_path, good, monkeypatch):
    tamper, message = TAMPERED[name]
    ckpt = torch.load(good, weights_only=True)
    tamper(ckpt)
    path = tmp_path / "tampered.pt"
    torch.save(ckpt, path)
    work = tmp_path / "work"
    work.mkdir()
    code, errors, stderr = cli_error(monkeypatch, work, "export", path)
    assert code == 1 and len(errors) == 1 and message in errors[0], stderr
    assert list(work.iterdir()) == [] and not (tmp_path.parent / "tmp" / "x").exists()


@pytest.mark.parametrize("old", [version1, legacy], ids=["stop-15 dict with card", "stop-7 dict, meta only"])
def test_old_checkpoints_load_export_and_resume(tmp_path, good, data_dir, old):
    from torchship.export.formats import export_checkpoint

    ckpt = torch.load(good, weights_only=True)
    old(ckpt)
    run = tmp_path / "run"
    run.mkdir()
    torch.save(ckpt, run / "last.pt")
    torch.save(ckpt, run / "best.pt")  # one epoch: the last is the best
    loaded = checkpoint.load(run / "last.pt", preset="mnist-mlp50")
    assert loaded.epoch == 1 and loaded.card.architecture.spec == "torchship.train.models:MLP"
    assert [h.val_loss for h in loaded.history] == ckpt["val_loss"]
    exp = export_checkpoint(run / "last.pt", tmp_path / "export", formats=("onnx",))
    assert exp.card.name == "mnist-mlp50" and (tmp_path / "export" / "model.onnx").is_file()
    metrics = train(quick("mnist-mlp50", epochs=2), run, data_dir, resume=True, quiet=True)
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]  # continued from the old file's epoch 1
    assert checkpoint.load(run / "last.pt").epoch == 2
