"""The serving stage's `torchship` subcommands, one module each; thin click layers over plain functions."""

from torchship.serve.cli.archive import archive_command
from torchship.serve.cli.deploy import deploy_group
from torchship.serve.cli.loadtest import loadtest_command
from torchship.serve.cli.page import page_command
from torchship.serve.cli.server import serve_group

__all__ = ["archive_command", "deploy_group", "loadtest_command", "page_command", "serve_group"]
