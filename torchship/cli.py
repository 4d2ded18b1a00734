"""The `torchship` console command: one subcommand per stage, each a thin layer over plain functions."""

from __future__ import annotations

import click

from torchship.export.cli import export_command, verify_command
from torchship.serve.cli.archive import archive_command
from torchship.serve.cli.deploy import deploy_group
from torchship.serve.cli.loadtest import loadtest_command
from torchship.serve.cli.page import page_command
from torchship.serve.cli.server import serve_group
from torchship.train.cli import train_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="torchship")
def main() -> None:
    """Train a model (or bring your own), export it with a proof, serve it (Open Inference Protocol or TorchServe)."""


main.add_command(train_command)
main.add_command(export_command)
main.add_command(verify_command)
main.add_command(archive_command)
main.add_command(serve_group)
main.add_command(loadtest_command)
main.add_command(deploy_group)
main.add_command(page_command)

if __name__ == "__main__":
    main()
