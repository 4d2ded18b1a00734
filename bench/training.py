"""Training: our resident-tensor loop vs the tutorials' loop (torchvision dataset -> DataLoader -> .to(device))."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from torchship.train.fit import train
from torchship.train.models import build_model
from torchship.train.presets import DEFAULT_PRESET, get_preset


def tutorial_loop(data_dir: Path, epochs: int, device: str = "cpu", seed: int = 1) -> dict:
    """pytorch/examples mnist/main.py's loop, with the same model, optimiser and jitter as our preset."""
    from torchvision import datasets, transforms

    from torchship.train.data import prepare_embedded, validation_indices

    p = get_preset(DEFAULT_PRESET, seed=seed)
    root = prepare_embedded(Path(data_dir))
    norm = transforms.Normalize((p.mean,), (p.std,))
    jitter = transforms.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.9, 1.1))
    train_set = datasets.MNIST(
        str(root), train=True, transform=transforms.Compose([jitter, transforms.ToTensor(), norm])
    )
    test_set = datasets.MNIST(str(root), train=False, transform=transforms.Compose([transforms.ToTensor(), norm]))
    keep, _ = validation_indices(len(train_set), p.val_fraction, p.seed)  # the same 90% our loop trains on
    subset = torch.utils.data.Subset(train_set, keep.tolist())
    kwargs = {"batch_size": p.batch_size, "num_workers": 1, "pin_memory": device.startswith("cuda")}
    loader = torch.utils.data.DataLoader(subset, shuffle=True, **kwargs)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=1000)
    torch.manual_seed(p.seed)  # also seeds the DataLoader's shuffling and the jitter
    dev = torch.device(device)
    model = build_model(p.arch).to(dev)
    opt = torch.optim.Adadelta(model.parameters(), lr=p.lr)
    seconds = []
    for _ in range(epochs):
        model.train()
        t = time.perf_counter()
        for x, y in loader:
            x, y = x.to(dev), y.to(dev)
            opt.zero_grad()
            loss = F.nll_loss(model(x), y)
            loss.backward()
            opt.step()
        seconds.append(time.perf_counter() - t)
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in test_loader:
            correct += (model(x.to(dev)).argmax(1) == y.to(dev)).sum().item()
    return {"epochs": epochs, "epoch_seconds": seconds, "test_accuracy": correct / len(test_set)}


def ours(data_dir: Path, out: Path, epochs: int, device: str = "auto", seed: int = 1) -> dict:
    p = get_preset(DEFAULT_PRESET, epochs=epochs, seed=seed)
    m = train(p, out, data_dir, device=device, quiet=True)
    return {
        "epochs": epochs,
        "epoch_seconds": [h["seconds"] for h in m["history"]],
        "test_accuracy": m["test_accuracy"],
        "device": m["device"],
    }


def run(data_dir: Path, out: Path, epochs: int = 15, device: str = "cpu", seeds=(1, 2)) -> dict:
    """Both loops with the same seeds; 1,000 test images make one run's accuracy good to about +-0.5 points."""
    dev = "cuda" if device == "auto" and torch.cuda.is_available() else device
    a = [ours(data_dir, out / f"ours-{s}", epochs, device, s) for s in seeds]
    b = [tutorial_loop(data_dir, epochs, dev, s) for s in seeds]

    def median_epoch(runs):
        seconds = sorted(x for r in runs for x in r["epoch_seconds"])
        return seconds[len(seconds) // 2]

    def mean_accuracy(runs):
        return sum(r["test_accuracy"] for r in runs) / len(runs)

    return {
        "seeds": list(seeds),
        "epochs": epochs,
        "ours": a,
        "tutorial": b,
        "ours_epoch_s": median_epoch(a),
        "tutorial_epoch_s": median_epoch(b),
        "ours_accuracy": mean_accuracy(a),
        "tutorial_accuracy": mean_accuracy(b),
        "ratio": median_epoch(a) / median_epoch(b),
        "accuracy_gap_points": 100 * (mean_accuracy(a) - mean_accuracy(b)),
    }


def processes(data_dir: Path, out: Path, epochs: int = 4, preset: str = DEFAULT_PRESET, counts=(1, 2)) -> dict:
    """Epoch time and images/s of the default preset with 1 and 2 processes (torchrun, gloo), run as a user would.

    The first epoch is left out (start-up, first touches of the data)."""
    import json
    import statistics
    import subprocess
    import sys

    rows = []
    for n in counts:
        run = out / f"ddp-{n}"
        cmd = [
            sys.executable,
            "-m",
            "torchship.cli",
            "train",
            "--preset",
            preset,
            "--epochs",
            str(epochs),
            "--out",
            str(run),
            "--data-dir",
            str(data_dir),
            "--nproc-per-node",
            str(n),
            "--quiet",
            "--device",
            "cpu",
        ]
        subprocess.run(cmd, check=True, capture_output=True)
        m = json.loads((run / "metrics.json").read_text())
        later = m["history"][1:] or m["history"]
        rows.append(
            {
                "processes": n,
                "epoch_s": statistics.median(h["seconds"] for h in later),
                "images_per_second": statistics.median(h["images_per_second"] for h in later),
                "test_accuracy": m["test_accuracy"],
            }
        )
    return {"preset": preset, "epochs": epochs, "cores": torch.get_num_threads(), "rows": rows}
