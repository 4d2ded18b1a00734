"""`torchship train`: a thin click layer over train.fit.train."""

from __future__ import annotations

import math
import os
import sys

import click

from torchship.train.presets import DATASETS, DEFAULT_PRESET, PRESETS, get_preset


def _hidden(_ctx, _param, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        sizes = [int(v) for v in value.split(",")]
    except ValueError:
        sizes = []
    if not sizes or not all(1 <= v <= 100_000 for v in sizes):
        raise click.BadParameter(f"comma-separated layer sizes from 1 to 100000, e.g. 64 or 250,100; got {value!r}")
    return sizes


def _positive(_ctx, param, value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"must be a positive number, got {value}")
    return value


@click.command("train")
@click.option(
    "--preset",
    type=click.Choice(list(PRESETS)),
    default=DEFAULT_PRESET,
    show_default=True,
    help="Tutorial model and hyperparameters.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Run directory for checkpoints and metrics  [default: runs/PRESET]",
)
@click.option(
    "--dataset",
    type=click.Choice(DATASETS),
    default=None,
    help="Override the preset's dataset (mnist-5k is embedded; the others download or read --data-dir).",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default="data",
    show_default=True,
    help="Where datasets live (torchvision's <dir>/MNIST/raw layout).",
)
@click.option(
    "--download/--no-download", default=True, show_default=True, help="Let torchvision download a missing dataset."
)
@click.option("--epochs", type=click.IntRange(1), default=None, help="Total epochs (with --resume: the new total).")
@click.option("--lr", type=float, callback=_positive, default=None, help="Learning rate (positive).")
@click.option("--batch-size", type=click.IntRange(1), default=None)
@click.option("--hidden", callback=_hidden, default=None, help="MLP hidden sizes, e.g. 64 or 250,100.")
@click.option("--seed", type=int, default=None)
@click.option("--scheduler", type=click.Choice(["none", "step", "onecycle"]), default=None)
@click.option(
    "--device", default="auto", show_default=True, help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps."
)
@click.option("--amp", is_flag=True, help="bf16 autocast (CUDA only).")
@click.option("--resume", is_flag=True, help="Continue from OUT/last.pt (model, optimiser, scheduler, RNG).")
@click.option("--quiet", is_flag=True, help="No progress bars or per-epoch lines.")
@click.option(
    "--nproc-per-node",
    type=click.IntRange(1, 1024),
    default=1,
    show_default=True,
    help="Processes on this machine, through torchrun (DistributedDataParallel: gloo on CPU, NCCL on GPUs).",
)
@click.option("--nnodes", type=click.IntRange(1, 1024), default=1, show_default=True, help="Machines in the run.")
@click.option("--node-rank", type=click.IntRange(0), default=0, show_default=True, help="This machine's number.")
@click.option(
    "--rdzv-endpoint",
    default=None,
    metavar="HOST:PORT",
    help="Where the machines gather (the same on every one; with --nnodes above 1).",
)
@click.option(
    "--rdzv-timeout",
    type=click.IntRange(1),
    default=60,
    show_default=True,
    help="Seconds to wait for every machine before failing.",
)
def train_command(
    preset,
    out_dir,
    dataset,
    data_dir,
    download,
    epochs,
    lr,
    batch_size,
    hidden,
    seed,
    scheduler,
    device,
    amp,
    resume,
    quiet,
    nproc_per_node,
    nnodes,
    node_rank,
    rdzv_endpoint,
    rdzv_timeout,
):
    """Train a preset and write resumable checkpoints, metrics.json and curves.png."""
    try:
        cfg = get_preset(
            preset,
            dataset=dataset,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            hidden=hidden,
            seed=seed,
            scheduler=scheduler,
        )
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    out_dir = out_dir or f"runs/{preset}"
    processes = nproc_per_node * nnodes
    if processes > 1 and "WORLD_SIZE" not in os.environ:  # not yet under torchrun: start it, once
        if cfg.batch_size % processes:
            raise click.BadParameter(
                f"the global batch of {cfg.batch_size} does not divide into {processes} processes",
                param_hint="--batch-size",
            )
        # c10d's C++ side logs every failed connection attempt with a stack; our one line says what failed
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
        # torch only now: it reads TORCH_CPP_LOG_LEVEL when imported, and `--help` stays fast
        from torchship.train.distributed import LaunchError, launch, without_launch_flags

        try:
            launch(
                without_launch_flags(sys.argv[1:]),
                nproc=nproc_per_node,
                nnodes=nnodes,
                node_rank=node_rank,
                endpoint=rdzv_endpoint,
                timeout=rdzv_timeout,
                out=out_dir,
            )
        except LaunchError as e:
            raise click.ClickException(str(e)) from None
        return
    # torch only once a run starts: `torchship --help` and a bad option answer in a fraction of a second
    from torchship.train.checkpoint import CheckpointError
    from torchship.train.data import DataError
    from torchship.train.device import DeviceError, pick_device
    from torchship.train.fit import TrainError, train

    try:
        pick_device(device)  # before any data is read: a missing GPU is the user's first thing to know
    except DeviceError as e:
        raise click.BadParameter(str(e), param_hint="--device") from None
    try:
        train(cfg, out_dir, data_dir, device=device, resume=resume, amp=amp, quiet=quiet, download=download)
    except (CheckpointError, DataError, DeviceError, TrainError) as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:  # an --out or --data-dir that cannot be written
        raise click.ClickException(f"{e.filename or out_dir}: {e.strerror or e}") from None
