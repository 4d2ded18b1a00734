"""The Open Inference Protocol server: N worker processes answering REST and gRPC on the same two ports, each
batching its requests into forward passes; a supervisor replaces any worker that dies while the others keep
answering, and changes the model repository in all of them at once.

python -m torchship.handlers.oip --model_dir EXPORT_OR_FOLDER [--model_dir ...] [--workers N] ...
python -m torchship.handlers.oip --config CONFIG.json   (what `torchship serve start --runtime oip` runs)
(the deploy bundle's container runs the same as torchship_handlers.oip)

REST: the supervisor listens and every worker accepts from that one socket, balanced by their shared connection
counts, so a connection waiting to be accepted outlives any worker (bench/NOTES.md, levers 39 and 57). gRPC: each
worker binds the port with SO_REUSEPORT while the supervisor holds it, so no other server can take it. A worker
accepts only after its warm-up pass at the largest batch succeeded: until one is warm, REST connections wait in the
queue and the gRPC port refuses them, so readiness is true only for a model that has answered.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from dataclasses import fields, replace

from .config import LOG_FORMAT, Config, ConfigError, Limits
from .supervisor import Supervisor

logger = logging.getLogger("torchship.oip")
# The command line's help, by the Config field each flag sets (the flag is the field's own name).
HELP = {
    "model_dirs": "an export (meta.json and the model file), or a folder of exports (up to two levels down: "
    "NAME/VERSION/); again for more; the repository calls load what is found here",
    "model_name": "serve the one model of --model_dir under this name  [default: its card's name]",
    "host": "address REST and gRPC listen on",
    "backend": "which exported file to run: onnx, onnx-int8, torchscript, pt2",
    "workers": "worker processes  [default: sizing.default_workers()]",
    "max_batch": "rows in one forward pass  [default: measured]",
    "max_batch_delay_ms": "how long a pass waits for company already on its way  [default: measured]",
    "threads": "intra-op threads per worker  [default: measured]",
    "pass_slots": "forward passes at once over all workers: a heavy model's workers each use every core and take "
    "turns  [default: measured; the number of workers or more: no limit]",
    "busy_threads": "a forward pass's intra-op threads while other passes run: below --threads, a pass alone runs on "
    "--threads and passes under load on this many each, from a second ONNX Runtime session  [default: measured]",
    "max_queue": "queued requests per worker before 503  [default: sizing.queue_size()]",
    "max_pixels": "largest decoded image  [default: the card's]",
    "admin_token_file": "the token the repository calls need: read from here, or written here when the file does "
    "not exist  [default: a new one beside the server's state]",
    "status_file": "where the supervisor keeps its account of the workers, as JSON",
    "loopback_admin": "let clients on this machine (loopback) call the repository API without the admin token, as "
    "Triton's own tools do (they send none); off by default: the token is required",
    "allow_client_shm": "let clients on this machine register system shared memory regions (/dev/shm) that the "
    "server then reads inputs from and writes outputs to, as Triton's --allow-client-shm; off by default",
    "triton_images": "serve image classifiers as Triton's image examples and perf_analyzer's shared memory need them: "
    "the FP32 NCHW input alone (FORMAT_NCHW) and the probabilities alone (classification names the labels)",
    "max_batch_tokens": "for models whose requests pad to a length (text): the most padded tokens one pass holds, its "
    "longest row times its rows, requests of similar lengths gathered first (TEI's --max-batch-tokens); 0: rows alone",
    "access_log": "a line per inference request (protocol, client, model version, status, ms, request id) in the "
    "log; off by default: ~10 us a request",
    "copy_weights": "every ONNX Runtime session loads its own copy of a large model's weights, optimized in its own "
    "heap; by default the supervisor saves the model once as ONNX Runtime optimizes it (about twice the weights, in "
    "the server's temporary folder) and every session maps that file, sharing one copy",
    "cache_dir": "keep a large model's optimized copy and every model's measured cost in this folder across restarts "
    "(a volume in Kubernetes), keyed by the model file and this machine: a restart skips optimizing and measuring "
    "[default: neither kept]",
    "trace_stages": "with tracing on (OTEL_EXPORTER_OTLP_ENDPOINT): a request's stages as its span's events, or as a "
    "child span each (twice the cost)  [default: events]",
}


def parser() -> argparse.ArgumentParser:
    """One flag per Config field (and per Limits field), named as the field is; --config reads them all from JSON."""
    ap = argparse.ArgumentParser(prog="python -m torchship.handlers.oip", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=None, help="a JSON configuration (Config's fields); flags given override it")
    ap.add_argument("--model_dir", dest="model_dirs", action="append", default=None, help=HELP["model_dirs"])
    for f in fields(Config):
        if f.name in ("model_dirs", "limits"):
            continue
        if f.type == "bool":
            ap.add_argument(f"--{f.name}", action="store_true", default=None, help=HELP.get(f.name))
            continue
        kind = {"int": int, "float": float}.get(f.type, str)
        shown = "" if f.name in HELP and "[default" in HELP[f.name] else f"  [default: {f.default}]"
        ap.add_argument(f"--{f.name}", type=kind, default=None, help=HELP.get(f.name, "") + shown)
    for f in fields(Limits):  # what one client may cost a worker, REST and gRPC (config.Limits says why each)
        ap.add_argument(f"--{f.name}", type=type(f.default), default=None, help=f"[default: {f.default}]")
    return ap


def config_from(argv: list[str] | None = None) -> Config:
    """The command line (over --config's file, when given) as one checked Config."""
    args = vars(parser().parse_args(argv))
    base = Config.load(args.pop("config")) if args.get("config") else None
    given = {k: v for k, v in args.items() if v is not None and k != "config"}
    limits = {f.name: given.pop(f.name) for f in fields(Limits) if f.name in given}
    if base is None:
        if not given.get("model_dirs"):
            raise ConfigError("give --model_dir (an export or a folder of exports), or --config")
        return Config(**given, limits=Limits(**limits))
    return replace(base, **given, limits=replace(base.limits, **limits))


def main(argv: list[str] | None = None) -> int:
    try:
        config = config_from(argv)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    logging.basicConfig(level=config.log_level, format=LOG_FORMAT, stream=sys.stdout)
    logging.getLogger("torchship.access").setLevel(logging.INFO if config.access_log else logging.WARNING)
    try:
        if not ipaddress.ip_address(config.host).is_loopback:
            logger.warning(
                "listening on %s: the Open Inference Protocol has no authentication of its own; put an "
                "authenticating proxy in front (docs/serving.md, 'Serve over the Open Inference Protocol')",
                config.host,
            )
    except ValueError:
        pass
    return Supervisor(config).run()


if __name__ == "__main__":
    sys.exit(main())
