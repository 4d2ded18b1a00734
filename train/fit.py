"""The training loop: one flat function per step, in the spirit of pytorch/examples mnist/main.py."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from torchship.train import checkpoint, data, distributed, record
from torchship.train.device import pick_device
from torchship.train.distributed import Ranks
from torchship.train.models import build_model
from torchship.train.plots import plot_curves, plot_line
from torchship.train.presets import Preset


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

    @property
    def image(self) -> bool:
        return self.train[0].dim() == 4


def criterion(preset: Preset):
    """The loss summed over samples (each sample's own mean over its elements), so ranks' shares add up exactly."""
    if preset.task == "regress":
        return lambda out, x, y: F.mse_loss(out, y, reduction="sum") / max(y[0].numel() if len(y) else 1, 1)
    if preset.task == "reconstruct":
        return lambda out, x, y: F.mse_loss(out, x, reduction="sum") / max(x[0].numel() if len(x) else 1, 1)
    if preset.arch == "convnet":  # the model ends in log_softmax
        return lambda out, x, y: F.nll_loss(out, y, reduction="sum")
    return lambda out, x, y: F.cross_entropy(out, y, reduction="sum")


@dataclass(frozen=True)
class Loop:
    """Everything an epoch needs, decided once from the preset and the ranks before training starts."""

    model: torch.nn.Module  # wrapped in DistributedDataParallel under torchrun
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    loss: Callable
    batch_size: int  # the global batch: every rank takes its share of each
    seed: int
    background: float | None  # jitter each batch over this background value, or None for no jitter
    classify: bool
    classes: int
    per_batch_schedule: bool
    ranks: Ranks
    amp: bool = False
    quiet: bool = False
    epoch_bars: bool = True  # a progress bar per epoch; runs of many short epochs get one bar over them instead


def prepare(preset: Preset, data_dir: Path | str, device: torch.device, download: bool = True) -> Prepared:
    if preset.dataset == "linreg-tutorial":  # the tutorial fits raw x and scores on its own 20 validation points
        train, val = data.tutorial_line()

        def rows(split: data.Split) -> tuple[torch.Tensor, torch.Tensor]:
            return split.images.to(device), split.labels.to(device)

        return Prepared(rows(train), rows(val), rows(val), 0.0, 1.0)
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


def train_epoch(loop: Loop, xy, epoch: int) -> Meter:
    """One pass over the training set in global batches fixed by the seed and the epoch (reproducible on resume
    and equal for any number of ranks); each rank computes its share, DDP averages the gradients."""
    loop.model.train()
    x, y = xy
    ranks = loop.ranks
    gen = torch.Generator().manual_seed(loop.seed * 100_003 + epoch)
    order = torch.randperm(len(x), generator=gen).to(x.device)
    bar = tqdm(
        total=len(x),
        desc=f"epoch {epoch}",
        unit="img",
        disable=loop.quiet or not ranks.main or not loop.epoch_bars,
        leave=False,
        dynamic_ncols=True,
        mininterval=0.5,
    )
    # sums stay on the device: a .item() per batch would make a GPU wait for every step
    sums = torch.zeros(3, dtype=torch.float64, device=x.device)  # loss, correct, samples of this rank
    for step, start in enumerate(range(0, len(x), loop.batch_size)):
        batch = order[start : start + loop.batch_size]
        mine = ranks.share(len(batch))
        xb, yb = x[batch[mine]], y[batch[mine]]
        if loop.background is not None:  # drawn for the whole global batch, so every split sees the same jitter
            xb = data.augment(xb, loop.background, data.jitter(len(batch), gen)[mine].to(x.device))
        with autocast(x.device, loop.amp):
            out = loop.model(xb)
            total = loop.loss(out.float(), xb, yb)
        # DDP averages over ranks; scaling by ranks/len(batch) makes that average the global batch's mean loss
        loss = total * (ranks.world_size / len(batch))
        loop.opt.zero_grad(set_to_none=True)
        loss.backward()
        loop.opt.step()
        if loop.per_batch_schedule:
            loop.sched.step()
        sums[0] += total.detach().double()
        if loop.classify:
            sums[1] += (out.argmax(1) == yb).sum()
        sums[2] += len(xb)
        bar.update(len(batch))
        if step % 20 == 0 and not loop.quiet and ranks.main:
            bar.set_postfix(loss=f"{sums[0].item() / max(sums[2].item(), 1):.4f}")
    bar.close()
    if not loop.per_batch_schedule:
        loop.sched.step()
    loss_sum, correct, seen = ranks.sum(sums).tolist()
    meter = Meter()
    meter.add(loss_sum / max(seen, 1), int(seen), int(correct))
    return meter


@torch.no_grad()
def evaluate(loop: Loop, xy, batch_size: int = 1000) -> tuple[Meter, list[float] | None]:
    """Loss/accuracy weighted by samples, plus per-class accuracy for classifiers; each rank scores its share
    and the sums are added over ranks, so every rank reports what one process would."""
    loop.model.eval()
    x, y = xy
    mine = loop.ranks.share(len(x))
    x, y = x[mine], y[mine]
    sums = torch.zeros(3 + 2 * loop.classes, dtype=torch.float64, device=x.device)  # loss, correct, n, hits, totals
    for xb, yb in data.batches(x, y, batch_size):
        with autocast(x.device, loop.amp):
            out = loop.model(xb).float()
        sums[0] += loop.loss(out, xb, yb).double()
        sums[2] += len(xb)
        if loop.classify:
            ok = out.argmax(1) == yb
            sums[1] += ok.sum()
            sums[3 : 3 + loop.classes] += torch.bincount(yb[ok], minlength=loop.classes).double()
            sums[3 + loop.classes :] += torch.bincount(yb, minlength=loop.classes).double()
    sums = loop.ranks.sum(sums).cpu()
    meter = Meter()
    meter.add(sums[0].item() / max(sums[2].item(), 1), int(sums[2]), int(sums[1]))
    hits, totals = sums[3 : 3 + loop.classes], sums[3 + loop.classes :]
    per_class = (hits / totals.clamp(min=1)).tolist() if loop.classify else None
    return meter, per_class


COMMUNICATION_FAILURES = ("Connection closed", "Connection reset", "connection", "gloo", "NCCL", "timed out")


class TrainError(Exception):
    """A training run that cannot start as asked; one line for the user."""


def train(
    preset: Preset,
    out_dir: Path | str,
    data_dir: Path | str = "data",
    *,
    device: str = "auto",
    resume: bool = False,
    amp: bool = False,
    quiet: bool = False,
    download: bool = True,
) -> dict:
    """Train a preset into out_dir, in this process or as one rank of torchrun's; returns what metrics.json holds."""
    dev = pick_device(device)
    ranks = distributed.init(dev)
    try:
        return run(preset, Path(out_dir), data_dir, dev, ranks, resume=resume, amp=amp, quiet=quiet, download=download)
    except (RuntimeError, torch.distributed.DistError) as e:
        lost = isinstance(e, torch.distributed.DistError) or any(w in str(e) for w in COMMUNICATION_FAILURES)
        if not (ranks.distributed and lost):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise TrainError(f"rank {ranks.rank} lost the other processes ({first})") from None
    finally:
        distributed.shutdown()


def run(
    preset: Preset,
    out: Path,
    data_dir,
    dev: torch.device,
    ranks: Ranks,
    *,
    resume: bool,
    amp: bool,
    quiet: bool,
    download: bool,
) -> dict:
    if preset.batch_size % ranks.world_size:
        raise TrainError(
            f"the global batch of {preset.batch_size} does not divide into {ranks.world_size} processes: "
            "pass --batch-size a multiple of the process count"
        )
    quiet = quiet or not ranks.main
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_stale_temps(out)
    torch.manual_seed(preset.seed)  # the same initial weights on every rank
    prep = prepare(preset, data_dir, dev, download)
    model = build_model(preset.arch, preset.arch_kwargs).to(dev)
    steps = -(-len(prep.train[0]) // preset.batch_size)
    opt, sched = make_optimizer(preset, model, steps)
    start, history, best = 1, [], float("inf")
    if resume:  # into the plain model, before it is wrapped: any number of processes may continue any run
        ckpt = ranks.from_main(lambda: checkpoint.load(out / "last.pt", preset=preset.name, map_location="cpu"))
        model.load_state_dict(ckpt.model)
        opt.load_state_dict(ckpt.optimizer)
        sched.load_state_dict(ckpt.scheduler)
        checkpoint.set_rng_state(ckpt.rng, dev)
        start, history = ckpt.epoch + 1, list(ckpt.history)
        best = min((h.val_loss for h in history), default=float("inf"))
    if ranks.rank:
        torch.manual_seed(preset.seed + ranks.rank)  # dropout differs between ranks, as between the samples
    loop = Loop(
        model=distributed.wrap(model, ranks, dev),
        opt=opt,
        sched=sched,
        loss=criterion(preset),
        batch_size=preset.batch_size,
        seed=preset.seed,
        background=-prep.mean / prep.std if preset.augment else None,
        classify=preset.task == "classify",
        classes=len(preset.labels),
        per_batch_schedule=preset.scheduler == "onecycle",
        ranks=ranks,
        amp=amp,
        quiet=quiet,
        epoch_bars=preset.checkpoint_every == 1,
    )
    if not quiet:
        procs = f" x {ranks.world_size} processes" if ranks.distributed else ""
        print(
            f"training {preset.name} on {preset.dataset} ({len(prep.train[0])} train / {len(prep.val[0])} val "
            f"/ {len(prep.test[0])} test) on {dev}{procs}, epochs {start}..{preset.epochs}"
        )
    epochs = range(start, preset.epochs + 1)
    for epoch in epochs if loop.epoch_bars else tqdm(epochs, desc="epochs", disable=quiet, leave=False):
        t0 = time.perf_counter()
        tr = train_epoch(loop, prep.train, epoch)
        seconds = time.perf_counter() - t0
        va, _ = evaluate(loop, prep.val)
        history.append(
            checkpoint.EpochRecord(
                epoch,
                tr.loss,
                va.loss,
                seconds,
                tr.samples / seconds,
                opt.param_groups[0]["lr"],
                ranks.world_size,
                tr.accuracy if loop.classify else None,
                va.accuracy if loop.classify else None,
            )
        )
        kept = epoch % preset.checkpoint_every == 0 or epoch == preset.epochs  # every epoch, for the digit presets
        if not quiet and kept:
            acc = f" acc {tr.accuracy:.4f} val_acc {va.accuracy:.4f}" if loop.classify else ""
            print(
                f"epoch {epoch}: loss {tr.loss:.4f} val_loss {va.loss:.4f}{acc} "
                f"({seconds:.2f}s, {tr.samples / seconds:.0f} {'img' if prep.image else 'rows'}/s)"
            )
        if ranks.main and kept:
            metrics = {"val_loss": va.loss, **({"val_accuracy": va.accuracy} if loop.classify else {})}
            state = checkpoint.Checkpoint(
                card=record.build_card(preset, prep, metrics),
                epoch=epoch,
                model=model.state_dict(),  # unwrapped
                optimizer=opt.state_dict(),
                scheduler=sched.state_dict(),
                history=tuple(history),
                rng=checkpoint.rng_state(dev),
                world_size=ranks.world_size,
                preset=preset.name,
                training=record.training_facts(preset, dev),
            ).to_dict()
            if va.loss < best or preset.keep == "last":
                checkpoint.save_atomic(state, out / "best.pt")
            checkpoint.save_atomic(state, out / "last.pt")
        best = min(best, va.loss) if kept else best
        ranks.barrier()
    return finish(preset, out, prep, loop, model, history)


def finish(preset: Preset, out: Path, prep: Prepared, loop: Loop, model, history) -> dict:
    """Score the best checkpoint on the held-out test set; rank 0 writes metrics.json and curves.png."""
    ranks, dev = loop.ranks, prep.test[0].device
    best = ranks.from_main(lambda: checkpoint.load(out / "best.pt", preset=preset.name, map_location="cpu"))
    model.load_state_dict(best.model)  # the wrapped model shares these parameters
    te, per_class = evaluate(loop, prep.test)
    metrics = {
        "preset": preset.name,
        "dataset": preset.dataset,
        "device": str(dev),
        "processes": ranks.world_size,
        "host": platform.node(),
        "best_epoch": best.epoch,
        "test_loss": te.loss,
        "test_accuracy": te.accuracy if loop.classify else None,
        "per_class_accuracy": dict(zip(preset.labels, per_class)) if per_class else None,
        "test_samples": te.samples,
        "history": [asdict(h) for h in history],
    }
    if preset.arch == "linear":
        metrics["fit"] = record.line_fit(model, prep.train)
    ranks.barrier()  # every rank has read best.pt before rank 0 rewrites it
    if ranks.main:
        scores = {"test_loss": te.loss, **({"test_accuracy": te.accuracy} if loop.classify else {})}
        card = replace(best.card, metrics={**best.card.metrics, **scores})
        checkpoint.save_atomic(replace(best, card=card).to_dict(), out / "best.pt")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        plot_curves(metrics["history"], out / "curves.png", title=preset.name, classify=loop.classify)
        if "fit" in metrics and prep.train[0].shape[1] == 1:
            plot_line(prep.train, prep.val, metrics["fit"], out / "fit.png", title=preset.name)
    if not loop.quiet:
        acc = f", test accuracy {te.accuracy:.4f}" if loop.classify else ""
        print(f"best epoch {best.epoch}: test loss {te.loss:.4f}{acc} -> {out}")
        if "fit" in metrics:
            f = metrics["fit"]
            print(
                f"fitted a = {f['fitted']['a']}, b = {f['fitted']['b']}; least squares on the same training points "
                f"a = {f['least_squares']['a']}, b = {f['least_squares']['b']} (largest difference "
                f"{f['max_difference']:.2e}); validation MSE {te.loss:.6f}"
            )
    ranks.barrier()
    return metrics
