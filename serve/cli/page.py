"""`torchship page`: a page that shows an export and runs its model in the browser."""

from __future__ import annotations

import time
from pathlib import Path

import click

from torchship.serve.page import PageError, serve, write_page


@click.command("page")
@click.argument("export_dir", type=click.Path(file_okay=False))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where to write the page  [default: EXPORT_DIR/page]",
)
@click.option("--serve", "serve_it", is_flag=True, help="Serve it on 127.0.0.1 and print its URL (Ctrl-C stops).")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="With --serve.")
@click.option(
    "--server-state",
    type=click.Path(file_okay=False),
    default=None,
    help="With --serve: the TorchServe (started from this state dir) that 'ask the server' relays to.",
)
def page_command(export_dir, out_dir, serve_it, port, server_state):
    """Write a page that shows EXPORT_DIR's card, proof and curves, and runs the model on what you draw or drop."""
    out = Path(out_dir or Path(export_dir) / "page")
    try:
        index = write_page(export_dir, out)
    except PageError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {index} (it needs an http:// URL, not file://: browsers refuse WebAssembly from files)")
    if not serve_it:
        return
    try:
        httpd = serve(out, port, server_state)
    except OSError as e:
        raise click.ClickException(f"cannot listen on 127.0.0.1:{port}: {e.strerror or e}") from None
    relay = f"; 'ask the server' relays to the TorchServe of {server_state}" if server_state else ""
    click.echo(f"serving the page at http://127.0.0.1:{httpd.server_address[1]}/{relay} (Ctrl-C stops)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        httpd.shutdown()
