"""`torchship archive`: an export into MODEL_STORE/NAME.mar, sized from the model's measured cost."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import click

from torchship.handlers.card import CARD_FILE, CardError, ModelCard, safe_name
from torchship.handlers.sizing import max_workers, measure, sized
from torchship.serve.archive import BACKENDS, ArchiveError, build_archive, model_config
from torchship.serve.settings import WORKER_LOG_LEVEL


@click.command("archive")
@click.argument("export_dir", type=click.Path(file_okay=False))
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default="onnx",
    show_default=True,
    help="Which exported model the archive carries (onnx-int8 and pt2 need `export --formats ...,int8,pt2`).",
)
@click.option("--model-store", type=click.Path(file_okay=False), default="model_store", show_default=True)
@click.option("--name", default=None, help="Model name  [default: the card's name]")
@click.option(
    "--workers",
    type=click.IntRange(1),
    default=None,
    help="Min = max workers  [default: two, or one per two cores if more]",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 256),
    default=None,
    help="Largest batch  [default: what the measured model runs in ~50 ms, at most 8]",
)
@click.option(
    "--max-batch-delay-ms",
    type=click.IntRange(1, 10_000),
    default=None,
    help="Milliseconds to wait for a fuller batch (TorchServe reads 0 as its default, 100)  "
    "[default: a tenth of one measured pass, 1-20]",
)
@click.option(
    "--threads",
    type=click.IntRange(1, 256),
    default=None,
    help="Intra-op threads per worker  [default: 1; cores/workers for models slower than 10 ms]",
)
@click.option("--response-timeout", type=click.IntRange(1), default=None, help="Seconds  [default: >= 30, measured]")
@click.option(
    "--max-pixels",
    type=click.IntRange(1024),
    default=None,
    help="Largest image the handler decodes  [default: 4,194,304 (2048x2048) or 4 model inputs]",
)
@click.option(
    "--copy-weights",
    is_flag=True,
    help="Each worker loads its own copy of a large ONNX model's weights (32 MiB or more); by default the first "
    "worker saves it once as ONNX Runtime optimizes it, in TorchServe's unpacked model folder, and all of them map it.",
)
@click.option(
    "--worker-log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default=WORKER_LOG_LEVEL,
    show_default=True,
    help="TorchServe worker's Python logging; INFO adds two lines per request and the PredictionTime metric.",
)
def archive_command(
    export_dir,
    backend,
    model_store,
    name,
    workers,
    batch_size,
    max_batch_delay_ms,
    threads,
    response_timeout,
    max_pixels,
    copy_weights,
    worker_log_level,
):
    """Package EXPORT_DIR into MODEL_STORE/NAME.mar with our handler, sized from the model's measured cost."""

    if workers is not None and workers > max_workers():
        raise click.BadParameter(
            f"{workers} workers on {os.cpu_count()} cores would queue behind each other and "
            f"starve the server; at most {max_workers()} here",
            param_hint="--workers",
        )
    if name is not None and not safe_name(name):
        raise click.BadParameter(f"{name!r} is not a safe name (letters, digits, '_', '-', '.')", param_hint="--name")
    if not (Path(export_dir) / CARD_FILE).is_file():
        raise click.ClickException(f"{Path(export_dir) / CARD_FILE} not found: run `torchship export` first")
    try:
        card = ModelCard.load(Path(export_dir))
        cost = measure(export_dir, backend, card)
    except (CardError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    cfg = model_config(sized(cost, workers), worker_log_level=worker_log_level.upper(), copy_weights=copy_weights)
    given = {
        "batchSize": batch_size,
        "maxBatchDelay": max_batch_delay_ms,
        "threads": threads,
        "responseTimeout": response_timeout,
        "max_pixels": max_pixels,
    }
    cfg = replace(cfg, **{k: v for k, v in given.items() if v is not None})
    try:
        mar = build_archive(export_dir, model_store, name=name, backend=backend, config=cfg)
    except ArchiveError as e:
        raise click.ClickException(str(e)) from None
    click.echo(
        f"measured {card.name} ({backend}, 1 thread): {cost.batch1_ms:.2f} ms at batch 1, "
        f"{cost.batch8_ms:.2f} ms at batch 8"
    )
    click.echo(
        f"wrote {mar}: {cfg.minWorkers} workers x {cfg.threads} thread(s), batch {cfg.batchSize}, "
        f"delay {cfg.maxBatchDelay} ms, timeout {cfg.responseTimeout} s"
    )
