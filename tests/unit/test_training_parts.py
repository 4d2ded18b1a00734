"""The training loop's parts on small tensors: metrics weighted by samples, evaluation in batches, presets, and
atomic saves."""

import pytest
import torch
import torch.nn.functional as F

from torchship.train import checkpoint
from torchship.train.distributed import Ranks
from torchship.train.fit import Loop, Meter, criterion, evaluate
from torchship.train.presets import PRESETS, get_preset


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
