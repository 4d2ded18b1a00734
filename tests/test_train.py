import json
import math

import pytest
import torch

from torchship.train import checkpoint
from torchship.train.fit import train
from torchship.train.presets import PRESETS, get_preset

from helpers import quick

IMAGE_PRESETS = [name for name, p in PRESETS.items() if p.input_kind == "image"]


@pytest.mark.parametrize("name", IMAGE_PRESETS)
def test_every_preset_trains_and_its_loss_falls(name, tmp_path, data_dir):
    preset = quick(name, dataset="mnist-5k")  # fashion-mlp too: the embedded digits stand in offline
    metrics = train(preset, tmp_path, data_dir, quiet=True)
    h = metrics["history"]
    assert h[-1]["loss"] < h[0]["loss"]
    assert all(math.isfinite(e["loss"]) for e in h)
    for f in ("last.pt", "best.pt", "metrics.json", "curves.png"):
        assert (tmp_path / f).stat().st_size > 0
    ckpt = checkpoint.load(tmp_path / "best.pt")
    card = ckpt.card
    assert ckpt.preset == card.name == name and card.input_shape == (1, 28, 28)
    assert card.metrics["test_loss"] == pytest.approx(metrics["test_loss"])
    assert card.labels == tuple(preset.labels) and card.dataset == "mnist-5k" and card.provenance.created_at
    if preset.task == "classify":
        assert metrics["test_accuracy"] > 0.3  # chance is 0.1; two epochs of SGD lr 0.5 are noisy
        assert set(metrics["per_class_accuracy"]) == set(preset.labels)


def test_fashion_preset_normalises_with_statistics_of_its_training_split(tmp_path, data_dir):
    train(quick("fashion-mlp", dataset="mnist-5k", epochs=1), tmp_path, data_dir, quiet=True)
    card = checkpoint.load(tmp_path / "best.pt").card
    assert 0.1 < card.mean[0] < 0.15 and 0.28 < card.std[0] < 0.33  # MNIST's own statistics


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, data_dir):
    """The convnet has dropout and batch jitter: both RNG streams must be restored exactly."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(quick("mnist-convnet", epochs=2), straight, data_dir, quiet=True)
    train(quick("mnist-convnet", epochs=1), split, data_dir, quiet=True)
    resumed = train(quick("mnist-convnet", epochs=2), split, data_dir, resume=True, quiet=True)
    a, b = checkpoint.load(straight / "last.pt"), checkpoint.load(split / "last.pt")
    assert a.epoch == b.epoch == 2
    for k, v in a.model.items():
        assert torch.equal(v, b.model[k]), k
    assert [h.val_loss for h in a.history] == [h.val_loss for h in b.history]
    assert json.loads((straight / "metrics.json").read_text())["test_loss"] == resumed["test_loss"]


def test_same_seed_same_metrics(tmp_path, data_dir):
    a = train(quick("mnist-mlp50"), tmp_path / "a", data_dir, quiet=True)
    b = train(quick("mnist-mlp50"), tmp_path / "b", data_dir, quiet=True)
    c = train(quick("mnist-mlp50", seed=7), tmp_path / "c", data_dir, quiet=True)
    assert [h["val_loss"] for h in a["history"]] == [h["val_loss"] for h in b["history"]]
    assert a["test_loss"] == b["test_loss"] != c["test_loss"]


def test_the_tutorials_linear_regression_fits_the_least_squares_line(tmp_path):
    """Its own data, 1,000 full-batch SGD epochs: the fitted a and b equal the least-squares solution to 1e-3."""
    metrics = train(get_preset("linreg"), tmp_path, quiet=True)
    fit = metrics["fit"]
    assert fit["max_difference"] < 1e-3
    assert fit["fitted"]["a"] == pytest.approx(1.0235, abs=1e-3)
    assert fit["fitted"]["b"] == pytest.approx(1.969, abs=1e-3)
    assert metrics["test_loss"] < 0.01  # the 20 validation points: noise of 0.1 gives an MSE near 0.01
    ckpt = checkpoint.load(tmp_path / "best.pt")
    card = ckpt.card
    assert (card.input_kind, card.input_shape, card.task, card.output_names) == ("tensor", (1,), "regress", ("y",))
    assert card.input_range[0][0] >= 0 and card.input_range[0][1] <= 1 and ckpt.epoch == 1000
    for f in ("curves.png", "fit.png", "metrics.json"):
        assert (tmp_path / f).stat().st_size > 0
