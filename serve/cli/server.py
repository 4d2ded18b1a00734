"""`torchship serve start|stop|status|key`: one interface for every runtime (serve/runtimes.py)."""

from __future__ import annotations

import json
import zipfile

import click

from torchship.handlers.formats import ORT_BACKENDS
from torchship.serve import oip, runtimes
from torchship.serve.process import ServerError, StartOptions
from torchship.serve.samples import write_sample
from torchship.serve.settings import LOOPBACK, OIP_PORTS, TORCHSERVE_PORTS
from torchship.serve.traces import OtlpSink, line
from torchship.train.presets import DEFAULT_PRESET

STATE = click.option(
    "--state-dir",
    type=click.Path(file_okay=False),
    default="serve-state",
    show_default=True,
    help="This instance's config, logs, keys and pid file; OIP: its cache (a large model's optimized copy, the "
    "measured costs), which makes the next start faster.",
)
TS, OIP = "TorchServe", "OIP"
PORT = click.IntRange(1, 65535)


@click.group("serve")
def serve_group():
    """Run a model on 127.0.0.1: TorchServe with our handler (default), or our Open Inference Protocol server."""


@serve_group.command("start")
@click.option(
    "--runtime",
    type=click.Choice(runtimes.CHOICES),
    default=runtimes.DEFAULT,
    show_default=True,
    help="torchserve, or oip: our Open Inference Protocol server, REST and gRPC (kserve: its old name).",
)
@click.option(
    "--model",
    default=DEFAULT_PRESET,
    show_default=True,
    help=f"{TS}: MODEL_STORE/MODEL.mar; {OIP}: the model's name in the v2 URLs.",
)
@click.option(
    "--model-store", type=click.Path(file_okay=False), default="model_store", show_default=True, help=f"{TS} only."
)
@click.option(
    "--export-dir",
    type=click.Path(file_okay=False),
    multiple=True,
    help=f"{OIP} only: an export to serve, or a folder of exports (NAME/VERSION/); again for more  "
    "[default: exports/MODEL]",
)
@STATE
@click.option(
    "--inference-port",
    type=PORT,
    default=None,
    help=f"HTTP inference  [default: {TORCHSERVE_PORTS.inference}; {OIP}: {OIP_PORTS[0]}]",
)
@click.option(
    "--grpc-port",
    type=PORT,
    default=None,
    help=f"gRPC inference  [default: {TS} {TORCHSERVE_PORTS.grpc_inference}, {OIP} {OIP_PORTS[1]}]",
)
@click.option("--management-port", type=PORT, default=None, help=f"{TS} only  [default: {TORCHSERVE_PORTS.management}]")
@click.option("--metrics-port", type=PORT, default=None, help=f"{TS} only  [default: {TORCHSERVE_PORTS.metrics}]")
@click.option(
    "--grpc-management-port",
    type=PORT,
    default=None,
    help=f"{TS} only: it binds gRPC management too  [default: {TORCHSERVE_PORTS.grpc_management}]",
)
@click.option(
    "--grpc-ports",
    type=(PORT, PORT),
    default=None,
    hidden=True,
    help="The gRPC inference and management ports together (earlier releases' spelling).",
)
@click.option("--no-token-auth", is_flag=True, help=f"{TS}: turn token authorisation off (local experiments).")
@click.option(
    "--cors-origin",
    default=None,
    metavar="ORIGIN",
    help=f"{TS}: the one browser origin (e.g. http://127.0.0.1:8765) allowed to call inference.",
)
@click.option(
    "--backend",
    type=click.Choice(ORT_BACKENDS),
    default="onnx",
    show_default=True,
    help=f"{OIP} only: which ONNX export to run.",
)
@click.option(
    "--host",
    default=LOOPBACK,
    show_default=True,
    help=f"{OIP} only: address to listen on; anything but loopback needs --behind-auth.",
)
@click.option(
    "--behind-auth",
    is_flag=True,
    help=f"{OIP} only: an authenticating proxy is in front (the protocol has no authentication).",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=None,
    help=f"{OIP} only: worker processes  [default: two, or one per two cores if more]",
)
@click.option(
    "--max-batch",
    type=click.IntRange(1, 256),
    default=None,
    help=f"{OIP} only: rows in one forward pass  [default: measured, as `archive` sizes TorchServe's]",
)
@click.option(
    "--max-batch-delay-ms",
    type=click.FloatRange(0, 1000),
    default=None,
    help=f"{OIP} only: ms a batch waits for requests already on their way  [default: measured]",
)
@click.option(
    "--max-batch-tokens",
    type=click.IntRange(0),
    default=None,
    help=f"{OIP} only: for text models, the most padded tokens one pass holds (its longest row times its rows), "
    "requests of similar lengths gathered first; 0: rows alone  [default: 16384]",
)
@click.option(
    "--loopback-admin",
    is_flag=True,
    help=f"{OIP} only: clients on this machine may call the repository API (load, unload) without the admin token, "
    "as Triton's own tools expect (they send none).",
)
@click.option(
    "--allow-client-shm",
    is_flag=True,
    help=f"{OIP} only: clients on this machine may register system shared memory regions for their tensors, as with "
    "Triton's --allow-client-shm (off by default).",
)
@click.option(
    "--triton-images",
    is_flag=True,
    help=f"{OIP} only: image classifiers as Triton's image examples and perf_analyzer's shared memory need them: the "
    "FP32 NCHW input alone (FORMAT_NCHW) and the probabilities alone (their classification names the labels).",
)
@click.option(
    "--access-log",
    is_flag=True,
    help=f"{OIP} only: a line per inference request in its log, with the "
    "request's id (TorchServe keeps its own access log)",
)
@click.option("--timeout", type=float, default=180, show_default=True, help="Seconds to wait until ready.")
def start_command(
    runtime,
    model,
    model_store,
    export_dir,
    state_dir,
    inference_port,
    grpc_port,
    management_port,
    metrics_port,
    grpc_management_port,
    grpc_ports,
    no_token_auth,
    cors_origin,
    backend,
    host,
    behind_auth,
    workers,
    max_batch,
    max_batch_delay_ms,
    max_batch_tokens,
    loopback_admin,
    allow_client_shm,
    triton_images,
    access_log,
    timeout,
):
    """Start a server and wait until MODEL is ready; print a working request to try."""

    if grpc_ports:
        grpc_port, grpc_management_port = grpc_port or grpc_ports[0], grpc_management_port or grpc_ports[1]
    chosen = runtimes.get(runtime)
    export_dir, more_exports = (export_dir[0], tuple(export_dir[1:])) if export_dir else (None, ())
    options = StartOptions(
        model,
        state_dir=state_dir,
        timeout=timeout,
        export_dir=export_dir,
        model_store=model_store,
        more_exports=more_exports,
        inference_port=inference_port,
        grpc_port=grpc_port,
        management_port=management_port,
        metrics_port=metrics_port,
        grpc_management_port=grpc_management_port,
        token_auth=not no_token_auth,
        cors_origin=cors_origin,
        backend=backend,
        host=host,
        behind_auth=behind_auth,
        workers=workers,
        max_batch=max_batch,
        max_batch_delay_ms=max_batch_delay_ms,
        max_batch_tokens=max_batch_tokens,
        access_log=access_log,
        loopback_admin=loopback_admin,
        allow_client_shm=allow_client_shm,
        triton_images=triton_images,
    )
    try:
        cfg = chosen.start(options)
    except ServerError as e:
        raise click.ClickException(str(e)) from None
    status = chosen.status(cfg.state_dir)
    try:  # the printed request is one this model takes; a digit if its card cannot be read
        card = chosen.card(cfg)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        card = None
    sample = write_sample(cfg.state_dir, card, export_dir=export_dir)
    where = ", ".join(f"{k} {status[k]}" for k in ("grpc", "metrics") if k in status)
    click.echo(f"{chosen.name} is serving {model} at {cfg.inference_url} ({where}); logs in {cfg.state_dir}/logs")
    click.echo(f"try it ({sample.what}):\n  {chosen.curl(cfg, sample)}")
    if status.get("models"):  # the OIP server: its repository, and the token its calls need
        click.echo(
            "models: "
            + ", ".join(
                f"{r['name']} {r['version']}" + (f" ({r['reason']})" if r["reason"] else "") for r in status["models"]
            )
        )
        click.echo(
            f"admin token for the repository calls (load, unload, route; `torchship serve key --api admin`): "
            f"{chosen.key(cfg.state_dir, 'admin')}"
        )


@serve_group.command("stop")
@STATE
def stop_command(state_dir):
    """Stop the server started from STATE_DIR, and only it (with its workers)."""
    runtime = runtimes.recorded(state_dir)
    click.echo("stopped" if runtime.stop(state_dir) else f"no {runtime.name} instance running from {state_dir}")


@serve_group.command("status")
@STATE
def status_command(state_dir):
    """Whether the instance runs, and its workers' state."""
    click.echo(json.dumps(runtimes.recorded(state_dir).status(state_dir), indent=2))


@serve_group.command("key")
@STATE
@click.option(
    "--api",
    type=click.Choice(["inference", "management", "admin"]),
    default="inference",
    show_default=True,
    help="inference or management: TorchServe's keys; admin: the OIP server's repository calls",
)
def key_command(state_dir, api):
    """Print the instance's token (for `Authorization: Bearer ...`)."""
    try:
        click.echo(runtimes.recorded(state_dir).key(state_dir, api))
    except ServerError as e:
        raise click.ClickException(str(e)) from None


def repository(op: str, state_dir: str, model: str | None, body: dict) -> None:
    try:
        rows = oip.repository_call(state_dir, op, model, body)
    except ServerError as e:
        raise click.ClickException(str(e)) from None
    for r in rows:
        click.echo(f"{r['name']} {r['version']}: {r['state']}" + (f" ({r['reason']})" if r["reason"] else ""))


@serve_group.command("load")
@click.option("--model", required=True, help="The model's name: every version of it in the server's exports loads.")
@click.option(
    "--default",
    "default",
    default=None,
    metavar="VERSION",
    help="The version to answer clients  [default: the newest proven one]",
)
@STATE
def load_command(model, default, state_dir):
    """OIP: load MODEL's versions from disk, each warmed in every worker before it takes traffic; the default moves
    in one step, and no request fails."""
    repository("load", state_dir, model, {"parameters": {"default": default} if default else {}})


@serve_group.command("unload")
@click.option("--model", required=True)
@click.option("--version", default=None, help="One version (not the default)  [default: the whole model]")
@STATE
def unload_command(model, version, state_dir):
    """OIP: unload a version (it answers what it holds first) or the whole model."""
    repository("unload", state_dir, model, {"parameters": {"version": version} if version else {}})


@serve_group.command("route")
@click.option("--model", required=True)
@click.option("--default", "default", default=None, metavar="VERSION", help="The version that answers clients.")
@click.option(
    "--canary", default=None, metavar="VERSION", help="A version that answers a share of the requests (`none` to stop)."
)
@click.option("--canary-percent", type=click.FloatRange(0, 100), default=None, help="The canary's share, in %.")
@click.option(
    "--shadow",
    default=None,
    metavar="VERSION",
    help="A version that also runs every request and is "
    "compared with the answer (`none` to stop); `serve status` shows how often they agree",
)
@STATE
def route_command(model, default, canary, canary_percent, shadow, state_dir):
    """OIP: where MODEL's requests go: its default, a canary's share, a shadow."""
    body = {
        k: v
        for k, v in {"default": default, "canary": canary, "canary_percent": canary_percent, "shadow": shadow}.items()
        if v is not None
    }
    for role in ("shadow", "canary"):
        if body.get(role) == "none":
            body[role] = None
    repository("route", state_dir, model, body)


@serve_group.command("traces")
@click.option("--port", type=PORT, default=4318, show_default=True, help="OTLP/HTTP's usual port.")
def traces_command(port):
    """Receive the OIP server's traces on 127.0.0.1:PORT and print each span as it arrives (Ctrl-C to stop): start
    the server with OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:PORT."""
    try:
        sink = OtlpSink(port, keep=False, on_span=lambda span: click.echo(line(span)))
    except OSError as e:
        raise click.ClickException(f"cannot listen on 127.0.0.1:{port}: {e.strerror}") from None
    click.echo(f"receiving traces at {sink.endpoint}/v1/traces: OTEL_EXPORTER_OTLP_ENDPOINT={sink.endpoint}")
    try:
        sink.thread.join()
    except KeyboardInterrupt:
        sink.close()
