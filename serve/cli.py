"""`torchship archive`, `torchship serve start|stop|status|key` and `torchship loadtest`: thin click layers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from torchship.serve.archive import BACKENDS
from torchship.serve.deploy import PROTOCOLS, RUNTIMES, SCALE_METRICS
from torchship.train.presets import DEFAULT_PRESET

ORT_BACKENDS = tuple(b for b in BACKENDS if b.startswith("onnx"))  # what the KServe runtime can run (no torch)
MAX_CONCURRENCY = 1024  # loopback clients, each a thread: more only measures the load generator


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
    "--max-batch-delay",
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
    "--worker-log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="WARNING",
    show_default=True,
    help="TorchServe worker's Python logging; INFO adds two lines per request and the PredictionTime metric.",
)
def archive_command(export_dir, backend, model_store, name, workers, batch_size, max_batch_delay, threads,
                    response_timeout, max_pixels, worker_log_level):  # fmt: skip
    """Package EXPORT_DIR into MODEL_STORE/NAME.mar with our image handler, sized from the model's measured cost."""
    from dataclasses import replace

    from torchship.runtime.card import CARD_FILE, CardError, ModelCard, safe_name
    from torchship.serve.archive import ArchiveError, build_archive, max_workers, measure, sized

    if workers is not None and workers > max_workers():
        raise click.BadParameter(
            f"{workers} workers on {os.cpu_count()} cores would queue behind each other and starve the server; "
            f"at most {max_workers()} here",
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
    cfg = sized(cost, workers)
    given = {"batchSize": batch_size, "maxBatchDelay": max_batch_delay, "threads": threads,
             "responseTimeout": response_timeout, "max_pixels": max_pixels}  # fmt: skip
    cfg = replace(cfg, worker_log_level=worker_log_level.upper(), **{k: v for k, v in given.items() if v is not None})
    try:
        mar = build_archive(export_dir, model_store, name=name, backend=backend, config=cfg)
    except ArchiveError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"measured {card.name} ({backend}, 1 thread): {cost.batch1_ms:.2f} ms at batch 1, "
               f"{cost.batch8_ms:.2f} ms at batch 8")  # fmt: skip
    click.echo(f"wrote {mar}: {cfg.minWorkers} workers x {cfg.threads} thread(s), batch {cfg.batchSize}, "
               f"delay {cfg.maxBatchDelay} ms, timeout {cfg.responseTimeout} s")  # fmt: skip


@click.group("serve")
def serve_group():
    """Run a served model on 127.0.0.1 with TorchServe (default) or KServe's Open Inference Protocol runtime."""


STATE = click.option(
    "--state-dir",
    type=click.Path(file_okay=False),
    default="serve-state",
    show_default=True,
    help="This instance's config, logs, keys and pid file.",
)


def runtime_of(state_dir) -> str:
    """Which runtime the instance recorded in STATE_DIR is (TorchServe when nothing says otherwise)."""
    f = Path(state_dir) / "instance.json"
    try:
        return json.loads(f.read_text()).get("runtime", "torchserve")
    except (OSError, ValueError, AttributeError):
        return "torchserve"


@serve_group.command("start")
@click.option(
    "--runtime",
    type=click.Choice(RUNTIMES),
    default="torchserve",
    show_default=True,
    help="TorchServe with our handler, or KServe's model server speaking the Open Inference Protocol.",
)
@click.option(
    "--model",
    default=DEFAULT_PRESET,
    show_default=True,
    help="TorchServe: MODEL_STORE/MODEL.mar; KServe: the model's name in the v2 URLs.",
)
@click.option(
    "--model-store", type=click.Path(file_okay=False), default="model_store", show_default=True, help="TorchServe only."
)
@click.option(
    "--export-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="KServe only: the export to serve  [default: exports/MODEL]",
)
@STATE
@click.option(
    "--inference-port",
    type=click.IntRange(1, 65535),
    default=8080,
    show_default=True,
    help="HTTP inference (KServe: every v2 REST route).",
)
@click.option(
    "--management-port", type=click.IntRange(1, 65535), default=8081, show_default=True, help="TorchServe only."
)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8082, show_default=True, help="TorchServe only.")
@click.option(
    "--grpc-ports",
    type=(click.IntRange(1, 65535), click.IntRange(1, 65535)),
    default=(7070, 7071),
    show_default=True,
    help="gRPC inference and management (KServe: the first is its v2 gRPC port).",
)
@click.option("--no-token-auth", is_flag=True, help="TorchServe: turn token authorisation off (local experiments).")
@click.option(
    "--cors-origin",
    default=None,
    metavar="ORIGIN",
    help="TorchServe: the one browser origin (e.g. http://127.0.0.1:8765) allowed to call inference.",
)
@click.option(
    "--backend",
    type=click.Choice(ORT_BACKENDS),
    default="onnx",
    show_default=True,
    help="KServe only: which ONNX export to run.",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="KServe only: address to listen on; anything but loopback needs --behind-auth.",
)
@click.option(
    "--behind-auth",
    is_flag=True,
    help="KServe only: an authenticating proxy is in front (the protocol has no authentication).",
)
@click.option("--timeout", type=float, default=180, show_default=True, help="Seconds to wait until ready.")
def start_command(runtime, model, model_store, export_dir, state_dir, inference_port, management_port, metrics_port,
                  grpc_ports, no_token_auth, cors_origin, backend, host, behind_auth, timeout):  # fmt: skip
    """Start a server and wait until MODEL is ready; print a working request to try."""
    from torchship.serve.process import ServerError
    from torchship.serve.samples import write_sample

    try:
        if runtime == "kserve":
            from torchship.serve import kserve

            cfg = kserve.KServeConfig(
                export_dir or f"exports/{model}", model, state_dir=state_dir,
                http_port=inference_port, grpc_port=grpc_ports[0], host=host, backend=backend,
            )  # fmt: skip
            cfg = kserve.start(cfg, timeout, behind_auth=behind_auth)
            sample, label = write_sample(Path(cfg.state_dir) / "sample-digit.png")
            click.echo(f"KServe is serving {model} at {cfg.inference_url}/v2/models/{model} (gRPC {cfg.grpc_address}); "
                       f"logs in {cfg.state_dir}/logs")  # fmt: skip
            click.echo(f"try it (a photographed-style {label}):\n  {kserve.curl_example(cfg, sample)}")
            return
        from torchship.serve import torchserve

        cfg = torchserve.ServerConfig(
            model, model_store=model_store, state_dir=state_dir, inference_port=inference_port,
            management_port=management_port, metrics_port=metrics_port, grpc_inference_port=grpc_ports[0],
            grpc_management_port=grpc_ports[1], token_auth=not no_token_auth, cors_origin=cors_origin,
        )  # fmt: skip
        cfg = torchserve.start(cfg, timeout)
    except ServerError as e:
        raise click.ClickException(str(e)) from None
    sample, label = write_sample(Path(cfg.state_dir) / "sample-digit.png")
    click.echo(
        f"TorchServe is serving {model} at {cfg.inference_url} (management {cfg.management_url}, "
        f"metrics {cfg.metrics_url}); logs in {cfg.state_dir}/logs"
    )
    click.echo(f"try it (a photographed-style {label}):\n  {torchserve.curl_example(cfg, sample)}")


def lifecycle(state_dir):
    """The lifecycle module of the runtime STATE_DIR records."""
    if runtime_of(state_dir) == "kserve":
        from torchship.serve import kserve

        return kserve
    from torchship.serve import torchserve

    return torchserve


@serve_group.command("stop")
@STATE
def stop_command(state_dir):
    """Stop the server started from STATE_DIR, and only it (with its workers)."""
    runtime = runtime_of(state_dir)
    click.echo("stopped" if lifecycle(state_dir).stop(state_dir) else f"no {runtime} instance running from {state_dir}")


@serve_group.command("status")
@STATE
def status_command(state_dir):
    """Whether the instance runs, and its workers' or model's state."""
    click.echo(json.dumps(lifecycle(state_dir).status(state_dir), indent=2))


@serve_group.command("key")
@STATE
@click.option("--api", type=click.Choice(["inference", "management"]), default="inference", show_default=True)
def key_command(state_dir, api):
    """Print the TorchServe instance's token (for `Authorization: Bearer ...`)."""
    from torchship.serve.torchserve import keys

    if runtime_of(state_dir) == "kserve":
        raise click.ClickException("the KServe runtime has no tokens: it listens on loopback, or behind your proxy")
    key = keys(state_dir).get(api, {}).get("key")
    if not key:
        raise click.ClickException(f"no {api} key in {state_dir}/key_file.json (token auth off, or not running)")
    click.echo(key)


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
    from torchship.serve.loadtest import image_payloads, sweep, table, write

    module = lifecycle(state_dir)
    if not module.status(state_dir).get("running"):
        raise click.ClickException(f"no server is running from {state_dir}: start one with `make serve`")
    try:
        bodies = image_payloads(images) if images else None
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    target = module.load_target(state_dir)
    levels = sweep(target, concurrency, duration, max_requests, rate, style, bodies=bodies)
    path = write(levels, out_dir, target, f"{target.model} on {runtime_of(state_dir)}")
    click.echo(table(levels))
    click.echo(f"wrote {path} and {Path(out_dir) / 'loadtest.png'}")


@click.group("deploy")
def deploy_group():
    """Write Kubernetes deploy bundles (validated offline against the kserve SDK's model classes)."""


@deploy_group.command("kserve")
@click.argument("export_dir", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Bundle directory.")
@click.option(
    "--runtime",
    type=click.Choice(RUNTIMES),
    default="torchserve",
    show_default=True,
    help="KServe's TorchServe runtime with our .mar, or our own KServe runtime in a custom container.",
)
@click.option(
    "--storage-uri",
    default=None,
    help="torchserve: where you upload the bundle (s3://, gs://, pvc://...)  [default: pvc://models/NAME]",
)
@click.option(
    "--image", default=None, help="kserve: the image you build from the Dockerfile  [default: torchship-NAME]"
)
@click.option(
    "--protocol",
    type=click.Choice(PROTOCOLS),
    default="v2",
    show_default=True,
    help="torchserve: the InferenceService's protocolVersion.",
)
@click.option("--backend", type=click.Choice(ORT_BACKENDS), default="onnx", show_default=True)
@click.option("--cpu", default="1", show_default=True, help="CPU request = limit per replica.")
@click.option("--memory", default="1Gi", show_default=True, help="Memory request = limit per replica.")
@click.option("--min-replicas", type=click.IntRange(0), default=1, show_default=True)
@click.option("--max-replicas", type=click.IntRange(1), default=3, show_default=True)
@click.option(
    "--scale-metric",
    type=click.Choice(SCALE_METRICS),
    default="concurrency",
    show_default=True,
)
@click.option("--scale-target", type=click.IntRange(1), default=8, show_default=True)
def deploy_kserve_command(export_dir, out_dir, runtime, storage_uri, image, protocol, backend, cpu, memory,
                          min_replicas, max_replicas, scale_metric, scale_target):  # fmt: skip
    """Write a KServe InferenceService bundle for EXPORT_DIR to OUT (Docker cannot run here: build it where it can)."""
    from torchship.runtime.card import CARD_FILE, CardError
    from torchship.serve.archive import ArchiveError
    from torchship.serve.deploy import DeployError, Resources, Scaling, write_bundle

    if not (Path(export_dir) / CARD_FILE).is_file():
        raise click.ClickException(f"{Path(export_dir) / CARD_FILE} not found: run `torchship export` first")
    try:
        files = write_bundle(export_dir, out_dir, runtime=runtime, storage_uri=storage_uri, image=image,
                             protocol=protocol, resources=Resources(cpu, memory), backend=backend,
                             scaling=Scaling(min_replicas, max_replicas, scale_metric, scale_target))  # fmt: skip
    except (DeployError, ArchiveError, CardError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    for f in files:
        click.echo(f"wrote {f}")
    click.echo(f"the InferenceService validates against the kserve SDK; apply it with: kubectl apply -f "
               f"{Path(out_dir) / 'inferenceservice.yaml'}")  # fmt: skip


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
    import time

    from torchship.serve.page import PageError, serve, write_page

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
