"""`torchship loadtest`: the running server, measured from 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import click

from torchship.serve import runtimes
from torchship.serve.cli.server import STATE
from torchship.serve.loadtest import image_payloads, sweep
from torchship.serve.report import table, write

MAX_CONCURRENCY = 1024  # loopback clients: more only measures the load generator


def concurrency_list(_ctx, _param, value: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(v) for v in value.split(","))
    except ValueError:
        levels = ()
    if not levels or not all(1 <= c <= MAX_CONCURRENCY for c in levels):
        raise click.BadParameter(
            f"comma-separated client counts from 1 to {MAX_CONCURRENCY}, e.g. 1,4,16; got {value!r}"
        )
    return levels


@click.command("loadtest")
@STATE
@click.option(
    "--concurrency",
    callback=concurrency_list,
    default="1,4,16",
    show_default=True,
    help="Comma-separated sweep of client counts.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0.1, max=100_000),
    default=None,
    help="Open loop: requests per second on a fixed schedule (latency from the intended send time).",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0.1, max=3600),
    default=10,
    show_default=True,
    help="Seconds per level (upper bound).",
)
@click.option(
    "--requests",
    "max_requests",
    type=click.IntRange(1, 10_000_000),
    default=20000,
    show_default=True,
    help="Requests per level (upper bound).",
)
@click.option(
    "--style",
    type=click.Choice(["mnist", "paper"]),
    default="mnist",
    show_default=True,
    help="Send digits as MNIST stores them, or as dark ink photographed on white paper.",
)
@click.option(
    "--images",
    type=click.Path(file_okay=False),
    default=None,
    help="Send your own images instead of digits; with DIR/<label>/ folders the answers are scored.",
)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="runs/loadtest", show_default=True)
def loadtest_command(state_dir, concurrency, rate, duration, max_requests, style, images, out_dir):
    """Measure the running server (from STATE_DIR) on 127.0.0.1: throughput, latency, accuracy."""
    runtime = runtimes.recorded(state_dir)
    if not runtime.status(state_dir).get("running"):
        raise click.ClickException(f"no server is running from {state_dir}: start one with `make serve`")
    try:
        bodies = image_payloads(images) if images else None
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    target = runtime.target(state_dir)
    levels = sweep(target, concurrency, duration, max_requests, rate, style, bodies=bodies)
    path = write(levels, out_dir, target, f"{target.model} on {runtime.name}")
    click.echo(table(levels))
    click.echo(f"wrote {path} and {Path(out_dir) / 'loadtest.png'}")
