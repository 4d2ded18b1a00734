"""The training loop: one flat function per step, in the spirit of pytorch/examples mnist/main.py."""

from __future__ import annotations

import datetime
import json
import platform
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from handlers.card import BUILTIN_ARCHITECTURES, Architecture, ModelCard, Provenance
from train import checkpoint, data
from train.device import is_main_process, pick_device
from train.models import INPUT_SHAPE, OUTPUT_KIND, build_model
from train.presets import Preset


@dataclass
class Meter:
    """Sums weighted by samples, so a short last batch counts for what it holds, no more."""

    loss_sum: float = 0.0
    correct: int = 0
    samples: int = 0

    def add(self, loss: float, n: int, correct: int = 0) -> None:
        self.loss_sum += loss * n
        self.correct += correct
        self.samples += n

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.samples, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.samples, 1)


@dataclass
class Prepared:
    """Normalised tensors resident on the device, ready to slice into batches."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    mean: float
    std: float
    history: list[dict] = field(default_factory=list)


def loss_fn(preset: Preset, out: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if preset.task == "reconstruct":
        return F.mse_loss(out, x)
    if preset.arch == "convnet":  # the model ends in log_softmax
        return F.nll_loss(out, y)
    return F.cross_entropy(out, y)


def prepare(preset: Preset, data_dir: Path | str, device: torch.device, download: bool = True) -> Prepared:
    train_all, test = data.load(preset.dataset, data_dir, download)
    train, val = data.split_validation(train_all, preset.val_fraction, preset.seed)
    mean, std = (preset.mean, preset.std) if preset.mean is not None else data.mean_std(train.images)

    def put(split: data.Split) -> tuple[torch.Tensor, torch.Tensor]:
        return data.to_tensor(split.images, mean, std, device), split.labels.to(device)

    return Prepared(put(train), put(val), put(test), mean, std)


def make_optimizer(preset: Preset, model: torch.nn.Module, steps_per_epoch: int):
    params = model.parameters()
    opt = {
        "sgd": lambda: torch.optim.SGD(params, lr=preset.lr),
        "adam": lambda: torch.optim.Adam(params, lr=preset.lr),
        "adadelta": lambda: torch.optim.Adadelta(params, lr=preset.lr),
    }[preset.optimizer]()
    if preset.scheduler == "step":  # stepped once per epoch, as in pytorch/examples
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    elif preset.scheduler == "onecycle":  # stepped once per batch
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=preset.lr,
            total_steps=preset.epochs * steps_per_epoch,
            cycle_momentum=preset.optimizer != "adadelta",
        )
    elif preset.scheduler == "none":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    else:
        raise ValueError(f"unknown scheduler {preset.scheduler!r}; choose none, step or onecycle")
    return opt, sched


def autocast(device: torch.device, amp: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else nullcontext()


def train_epoch(preset, model, opt, sched, xy, epoch, prep_mean_std=(0.0, 1.0), amp=False, quiet=False) -> Meter:
    model.train()
    x, y = xy
    meter = Meter()
    gen = torch.Generator().manual_seed(preset.seed * 100_003 + epoch)  # reproducible on resume
    bar = tqdm(
        total=len(x), desc=f"epoch {epoch}", unit="img", disable=quiet, leave=False, dynamic_ncols=True, mininterval=0.5
    )
    background = -prep_mean_std[0] / prep_mean_std[1]
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    correct, seen = torch.zeros((), dtype=torch.long, device=x.device), 0
    for step, (xb, yb) in enumerate(data.batches(x, y, preset.batch_size, gen)):
        if preset.augment:
            xb = data.augment(xb, background, gen)
        with autocast(x.device, amp):
            out = model(xb)
            loss = loss_fn(preset, out.float(), xb, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if preset.scheduler == "onecycle":
            sched.step()
        # sums stay on the device: a .item() per batch would make a GPU wait for every step
        loss_sum += loss.detach().double() * len(xb)
        if preset.task == "classify":
            correct += (out.argmax(1) == yb).sum()
        seen += len(xb)
        bar.update(len(xb))
        if step % 20 == 0 and not quiet:
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}")
    bar.close()
    meter.add(loss_sum.item() / max(seen, 1), seen, int(correct))
    if preset.scheduler != "onecycle":
        sched.step()
    return meter


@torch.no_grad()
def evaluate(preset: Preset, model, xy, amp=False, batch_size: int = 1000) -> tuple[Meter, list[float] | None]:
    """Loss/accuracy weighted by samples, plus per-class accuracy for classifiers."""
    model.eval()
    x, y = xy
    meter = Meter()
    classes = len(preset.labels)
    hits, totals = torch.zeros(classes), torch.zeros(classes)
    for xb, yb in data.batches(x, y, batch_size):
        with autocast(x.device, amp):
            out = model(xb).float()
        loss = loss_fn(preset, out, xb, yb)
        correct = 0
        if preset.task == "classify":
            ok = (out.argmax(1) == yb).cpu()
            correct = int(ok.sum())
            hits += torch.bincount(yb.cpu()[ok], minlength=classes).float()
            totals += torch.bincount(yb.cpu(), minlength=classes).float()
        meter.add(loss.item(), len(xb), correct)
    per_class = (hits / totals.clamp(min=1)).tolist() if preset.task == "classify" else None
    return meter, per_class


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def build_card(preset: Preset, prep: Prepared, metrics: dict) -> ModelCard:
    """What export, serving and apps need to know about the model, and nothing about how it was trained."""
    return ModelCard(
        name=preset.name,
        task=preset.task,
        input_shape=INPUT_SHAPE,
        mean=prep.mean,
        std=prep.std,
        labels=tuple(preset.labels),
        preprocess=preset.preprocess,
        output_kind=OUTPUT_KIND[preset.arch],
        architecture=Architecture(BUILTIN_ARCHITECTURES[preset.arch], dict(preset.arch_kwargs)),
        provenance=Provenance(torch=str(torch.__version__), created_at=now()),
        dataset=preset.dataset,
        metrics=metrics,
    )


def build_meta(preset: Preset, device: torch.device) -> dict:
    """How the model was trained: what `--resume` checks and a reader of the checkpoint wants to know."""
    return {"preset": preset.name, "hparams": preset.to_dict(), "seed": preset.seed, "device": str(device),
            "torch_version": str(torch.__version__)}  # fmt: skip


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def train(
    preset: Preset,
    out_dir: Path | str,
    data_dir: Path | str = "data",
    device: str = "auto",
    resume: bool = False,
    amp: bool = False,
    quiet: bool = False,
    download: bool = True,
) -> dict:
    """Train a preset into out_dir; returns the metrics written to metrics.json."""
    out = Path(out_dir)
    dev = pick_device(device)
    writer = is_main_process()
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_stale_temps(out)
    torch.manual_seed(preset.seed)
    prep = prepare(preset, data_dir, dev, download)
    model = build_model(preset.arch, preset.arch_kwargs).to(dev)
    steps = -(-len(prep.train[0]) // preset.batch_size)
    opt, sched = make_optimizer(preset, model, steps)
    start, history, best = 1, [], float("inf")
    if resume:
        ckpt = checkpoint.load(out / "last.pt", preset=preset.name, map_location=dev)
        model.load_state_dict(ckpt["model_state_dict"])
        opt.load_state_dict(ckpt["optimizer_state_dict"])
        sched.load_state_dict(ckpt["scheduler_state_dict"])
        set_rng_state(ckpt["rng_state"], dev)
        start, history = ckpt["epoch"] + 1, ckpt["history"]
        best = min((h["val_loss"] for h in history), default=float("inf"))
    if not quiet:
        print(
            f"training {preset.name} on {preset.dataset} ({len(prep.train[0])} train / {len(prep.val[0])} val "
            f"/ {len(prep.test[0])} test) on {dev}, epochs {start}..{preset.epochs}"
        )
    for epoch in range(start, preset.epochs + 1):
        t0 = time.perf_counter()
        tr = train_epoch(preset, model, opt, sched, prep.train, epoch, (prep.mean, prep.std), amp, quiet)
        seconds = time.perf_counter() - t0
        va, _ = evaluate(preset, model, prep.val, amp)
        history.append(
            {
                "epoch": epoch,
                "loss": tr.loss,
                "accuracy": tr.accuracy,
                "val_loss": va.loss,
                "val_accuracy": va.accuracy,
                "seconds": seconds,
                "images_per_second": tr.samples / seconds,
                "lr": opt.param_groups[0]["lr"],
            }
        )
        if not quiet:
            acc = f" acc {tr.accuracy:.4f} val_acc {va.accuracy:.4f}" if preset.task == "classify" else ""
            print(
                f"epoch {epoch}: loss {tr.loss:.4f} val_loss {va.loss:.4f}{acc} "
                f"({seconds:.2f}s, {tr.samples / seconds:.0f} img/s)"
            )
        if not writer:
            continue
        state = {
            "epoch": epoch,
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": opt.state_dict(),
            "scheduler_state_dict": sched.state_dict(),
            "loss": [h["loss"] for h in history],
            "val_loss": [h["val_loss"] for h in history],
            "history": history,
            "rng_state": rng_state(dev),
            "card": build_card(preset, prep, {"val_loss": va.loss, "val_accuracy": va.accuracy}).to_dict(),
            "meta": build_meta(preset, dev),
        }
        if va.loss < best:
            best = va.loss
            checkpoint.save_atomic(state, out / "best.pt")
        checkpoint.save_atomic(state, out / "last.pt")
    return finish(preset, out, prep, dev, history, amp, writer, quiet)


def finish(preset, out: Path, prep: Prepared, dev, history, amp, writer, quiet) -> dict:
    """Score the best checkpoint on the held-out test set; write metrics.json and curves.png."""
    best = checkpoint.load(out / "best.pt", preset=preset.name, map_location=dev)
    model = build_model(preset.arch, preset.arch_kwargs).to(dev)
    model.load_state_dict(best["model_state_dict"])
    te, per_class = evaluate(preset, model, prep.test, amp)
    metrics = {
        "preset": preset.name,
        "dataset": preset.dataset,
        "device": str(dev),
        "host": platform.node(),
        "best_epoch": best["epoch"],
        "test_loss": te.loss,
        "test_accuracy": te.accuracy if preset.task == "classify" else None,
        "per_class_accuracy": dict(zip(preset.labels, per_class)) if per_class else None,
        "test_samples": te.samples,
        "history": history,
    }
    if writer:
        best["card"]["metrics"].update(test_loss=te.loss, test_accuracy=metrics["test_accuracy"])
        checkpoint.save_atomic(best, out / "best.pt")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        from train.plots import plot_curves

        plot_curves(history, out / "curves.png", title=preset.name, classify=preset.task == "classify")
    if not quiet:
        acc = f", test accuracy {te.accuracy:.4f}" if preset.task == "classify" else ""
        print(f"best epoch {best['epoch']}: test loss {te.loss:.4f}{acc} -> {out}")
    return metrics
