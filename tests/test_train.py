import json
import math

import pytest
import torch
import torch.nn.functional as F

from torchship.train import checkpoint
from torchship.train.distributed import Ranks
from torchship.train.fit import Loop, Meter, criterion, evaluate, train
from torchship.train.presets import PRESETS, get_preset

from helpers import quick

IMAGE_PRESETS = [name for name, p in PRESETS.items() if p.input_kind == "image"]


@pytest.mark.slow  # trains
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


@pytest.mark.slow  # trains
def test_fashion_preset_normalises_with_statistics_of_its_training_split(tmp_path, data_dir):
    train(quick("fashion-mlp", dataset="mnist-5k", epochs=1), tmp_path, data_dir, quiet=True)
    card = checkpoint.load(tmp_path / "best.pt").card
    assert 0.1 < card.mean[0] < 0.15 and 0.28 < card.std[0] < 0.33  # MNIST's own statistics


@pytest.mark.slow  # trains
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


@pytest.mark.slow  # trains
def test_same_seed_same_metrics(tmp_path, data_dir):
    a = train(quick("mnist-mlp50"), tmp_path / "a", data_dir, quiet=True)
    b = train(quick("mnist-mlp50"), tmp_path / "b", data_dir, quiet=True)
    c = train(quick("mnist-mlp50", seed=7), tmp_path / "c", data_dir, quiet=True)
    assert [h["val_loss"] for h in a["history"]] == [h["val_loss"] for h in b["history"]]
    assert a["test_loss"] == b["test_loss"] != c["test_loss"]


def test_meter_weights_by_samples_not_by_batches():
    m = Meter()
    m.add(loss=1.0, n=100, correct=100)
    m.add(loss=3.0, n=1, correct=0)  # a short last batch
    assert m.loss == pytest.approx(103 / 101)
    assert m.accuracy == pytest.approx(100 / 101)


def test_evaluate_equals_one_big_batch_when_the_last_batch_is_short(data_dir):
    preset = get_preset("mnist-mlp")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    x, y = torch.randn(1001, 1, 28, 28), torch.randint(0, 10, (1001,))
    loop = Loop(
        model=model,
        opt=None,
        sched=None,
        loss=criterion(preset),
        batch_size=128,
        seed=1,
        background=None,
        classify=True,
        classes=10,
        per_batch_schedule=False,
        ranks=Ranks(),
    )
    meter, _ = evaluate(loop, (x, y), batch_size=100)  # ten of 100, one of 1
    with torch.no_grad():
        out = model(x)
    assert meter.loss == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-5)
    assert meter.accuracy == pytest.approx((out.argmax(1) == y).float().mean().item())


def test_preset_overrides_and_unknown_presets():
    p = get_preset("mnist-mlp", hidden=[64, 32], lr=0.1, epochs=None)
    assert p.arch_kwargs == {"hidden": [64, 32]} and p.lr == 0.1 and p.epochs == PRESETS["mnist-mlp"].epochs
    with pytest.raises(ValueError):
        get_preset("mnist-convnet", hidden=[3])
    with pytest.raises(KeyError):
        get_preset("resnet")


def test_atomic_save_leaves_no_temp_files(tmp_path):
    checkpoint.save_atomic({"x": torch.ones(3)}, tmp_path / "a.pt")
    checkpoint.save_atomic({"x": torch.zeros(3)}, tmp_path / "a.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]
    assert torch.load(tmp_path / "a.pt", weights_only=True)["x"].sum() == 0


@pytest.mark.slow  # trains
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
