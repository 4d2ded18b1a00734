"""`torchship export` and `torchship verify`: thin click layers over export.artifacts and export.verify."""

from __future__ import annotations

import click

TOLERANCES = [
    click.option("--atol", type=float, default=1e-5, show_default=True, help="Absolute tolerance."),
    click.option("--rtol", type=float, default=1e-4, show_default=True, help="Relative tolerance."),
    click.option(
        "--data-dir",
        type=click.Path(file_okay=False),
        default="data",
        show_default=True,
        help="Where the embedded held-out digits are unpacked.",
    ),
]


def tolerances(f):
    for option in reversed(TOLERANCES):
        f = option(f)
    return f


def check(export_dir, atol, rtol, data_dir, ckpt=None) -> None:
    from export.verify import VerificationError, failure_message, table, verify, write_report
    from train.checkpoint import CheckpointError

    try:
        report = verify(export_dir, atol, rtol, ckpt, data_dir)
    except (VerificationError, CheckpointError) as e:
        raise click.ClickException(str(e)) from None
    path = write_report(report, export_dir)
    click.echo(table(report))
    click.echo(f"wrote {path}")
    if not report.passed:
        raise click.ClickException(failure_message(report))


@click.command("export")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Export directory  [default: exports/PRESET]",
)
@tolerances
def export_command(checkpoint, out_dir, atol, rtol, data_dir):
    """Export CHECKPOINT to TorchScript and ONNX, then prove both match the eager model."""
    from export.artifacts import export_checkpoint
    from train.checkpoint import CheckpointError
    from train.checkpoint import load as load_ckpt

    try:
        out_dir = out_dir or f"exports/{load_ckpt(checkpoint)['meta']['preset']}"
        exported = export_checkpoint(checkpoint, out_dir)
    except CheckpointError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"exported {exported.meta['preset']} to {exported.torchscript} and {exported.onnx}")
    check(out_dir, atol, rtol, data_dir, checkpoint)


@click.command("verify")
@click.argument("export_dir", type=click.Path(file_okay=False))
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False),
    default=None,
    help="Source checkpoint  [default: the path recorded in meta.json]",
)
@tolerances
def verify_command(export_dir, checkpoint, atol, rtol, data_dir):
    """Re-run the equivalence check (eager vs TorchScript vs ONNX Runtime) on an export directory."""
    check(export_dir, atol, rtol, data_dir, checkpoint)
