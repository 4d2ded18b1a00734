"""The Open Inference Protocol server: N worker processes answering REST and gRPC on the same two ports, each
batching its requests into forward passes; a supervisor replaces any worker that dies while the others keep
answering, and changes the model repository in all of them at once (handlers/control.py).

python -m torchship.handlers.oip_server --model_dir EXPORT_OR_FOLDER [--model_dir ...] [--workers N] ...
(`torchship serve start --runtime oip` runs it; so does the deploy bundle's container, as torchship_handlers.)

Every worker listens on both ports with SO_REUSEPORT, so the kernel spreads connections over the workers (one socket
shared by all let whichever woke first take every waiting connection: 16 clients on one worker, none on the other;
bench/NOTES.md, lever 39). The supervisor holds both ports meanwhile, so no other server can take them. A worker
listens only after its warm-up pass at the largest batch succeeded: until one is warm, the ports refuse connections,
so readiness is true only for a model that has answered.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

from . import metrics, sizing
from .card import ModelCard
from .http11 import Limits

logger = logging.getLogger("torchship.oip")
HTTP_PORT, GRPC_PORT = 8080, 8081  # KServe's ports for a custom predictor container: REST, then gRPC
GIVE_UP_AFTER = 3  # a worker that dies this many times in a row before it is ready will not come up: stop
STOP_GRACE_S = 10


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="oip_server", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model_dir",
        required=True,
        action="append",
        help="an export (meta.json and the model file), "
        "or a folder of exports (up to two levels down: NAME/VERSION/); again for more; the repository "
        "calls load what is found here",
    )
    ap.add_argument(
        "--model_name",
        default=None,
        help="serve the one model of --model_dir under this name  [default: its card's name]",
    )
    ap.add_argument(
        "--admin_token_file",
        default=None,
        help="the token the repository calls need: read from here, or "
        "written here when the file does not exist  [default: a new one beside the server's state]",
    )
    ap.add_argument("--host", default="127.0.0.1", help="address REST and gRPC listen on")
    ap.add_argument("--http_port", type=int, default=HTTP_PORT)
    ap.add_argument("--grpc_port", type=int, default=GRPC_PORT)
    ap.add_argument("--backend", default="onnx", help="which exported file to run: onnx, onnx-int8, torchscript, pt2")
    ap.add_argument("--workers", type=int, default=0, help="worker processes  [default: sizing.default_workers()]")
    ap.add_argument("--max_batch", type=int, default=0, help="rows in one forward pass  [default: measured]")
    ap.add_argument("--max_delay_ms", type=float, default=-1, help="wait for company on its way  [default: measured]")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads per worker  [default: measured]")
    ap.add_argument(
        "--max_queue", type=int, default=0, help="queued requests per worker before 503 [default: sizing.queue_size()]"
    )
    ap.add_argument("--max_pixels", type=int, default=0, help="largest decoded image  [default: the card's]")
    for f in fields(Limits):  # what one client may cost a worker, REST and gRPC (http11.Limits says why each)
        ap.add_argument(f"--{f.name}", type=type(f.default), default=f.default, help=f"[default: {f.default}]")
    ap.add_argument("--status_file", default=None, help="where the supervisor keeps its workers' pids, as JSON")
    ap.add_argument("--log_level", default="INFO")
    ap.add_argument(
        "--access_log",
        action="store_true",
        help="a line per inference request (protocol, client, model "
        "version, status, ms, request id) in the log; off by default: ~10 us a request",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ready_fd", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--control", default=None, help=argparse.SUPPRESS)  # the supervisor's control socket
    ap.add_argument("--repository_state", default=None, help=argparse.SUPPRESS)  # the state it saved
    return ap


def complete(args: argparse.Namespace, state) -> argparse.Namespace:
    """Every choice the flags leave open, decided once by the shared sizing rule from a measured pass."""
    if args.workers <= 0:
        args.workers = sizing.default_workers()
    if args.max_queue <= 0:
        args.max_queue = sizing.queue_size(args.max_body)
    if args.max_batch <= 0 or args.max_delay_ms < 0 or args.threads <= 0:
        first = next(iter(state.models.values()))  # one setting for every model: the first one's measured cost
        export = first.versions[first.route.default].directory
        try:
            cost = sizing.measure(export, args.backend, ModelCard.load(export))
        except Exception as e:  # a model that fails here fails in every worker: say so once, plainly
            raise SystemExit(
                f"measuring {export} at batches of 1 and 8 failed ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200] if str(e) else ''}); give --max_batch, --max_delay_ms "
                "and --threads to skip the measurement"
            ) from None
        sized = sizing.sized(cost, args.workers)
        logger.info(
            "measured %s: %.2f ms at batch 1, %.2f ms at batch 8 (one thread)", export, cost.batch1_ms, cost.batch8_ms
        )
        args.max_batch = args.max_batch if args.max_batch > 0 else sized.max_batch
        args.max_delay_ms = args.max_delay_ms if args.max_delay_ms >= 0 else sized.max_delay_ms
        args.threads = args.threads if args.threads > 0 else sized.threads
    return args


# The worker: the repository's models, a batcher each, REST and gRPC on one event loop.


def settings(args: argparse.Namespace):
    from .serving import Settings

    return Settings(args.backend, args.threads, args.max_pixels, args.max_batch, args.max_delay_ms, args.max_queue)


def loader(args: argparse.Namespace) -> Callable:
    """(name, export directory) -> the version loaded and warm at the largest batch, or the error that stops it."""
    from . import serving

    chosen = settings(args)

    def load(name: str, directory: str):
        served = serving.load(directory, chosen, name=name)
        try:
            serving.warm_up(served)
        except Exception as e:  # a model that cannot run a full batch must never take traffic
            raise RuntimeError(
                f"warm-up: a batch of {chosen.max_batch} failed ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:300] if str(e) else ''}); --max_batch lower?"
            ) from None
        return served

    return load


def served_names(args: argparse.Namespace) -> dict[str, str]:
    """--model_name: the one model of the first --model_dir served under that name (served name -> card name)."""
    from .repository import RepositoryError, exports_below

    if not args.model_name:
        return {}
    names = {e.name for e in exports_below(args.model_dir[0], args.backend)}
    if len(names) != 1:
        raise RepositoryError(f"--model_name names one model; {args.model_dir[0]} holds {len(names)}")
    return {args.model_name: names.pop()}


def worker_repository(state, load: Callable):
    """Every version STATE names, loaded and warm, routed as it says."""
    from .repository import Model, Repository

    repo = Repository(state)
    repo.models = {
        name: Model(name, {v: load(name, spec.directory) for v, spec in m.versions.items()}, m.route)
        for name, m in state.models.items()
    }
    return repo


def worker(args: argparse.Namespace) -> int:
    from .repository import State

    load = loader(args)
    try:
        repo = worker_repository(State.load(args.repository_state), load)
    except Exception as e:
        logger.error("%s; this worker will not serve", str(e).splitlines()[0][:400] if str(e) else type(e).__name__)
        return 3
    ready = json.dumps({"pid": os.getpid(), "warmup": next(s.warmup for s in repo.served())}) + "\n"
    return serve_model(repo, args, load, lambda: os.write(args.ready_fd, ready.encode()))


def serve_model(repo, args: argparse.Namespace, load: Callable, announce: Callable[[], object]) -> int:
    """REST and gRPC over a loaded, warm repository until SIGTERM, following the supervisor's changes to it;
    `announce` once both listen."""
    from . import control, http11, oip_grpc, tracing
    from . import metrics as metric
    from .oip_rest import RestApp, error

    http = listening_socket(args.host, args.http_port)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        for s in repo.served():
            s.batcher.start()
        app = RestApp(repo, settings(args), control.Admin(control.read_token(args.admin_token_file), args.control))
        grpc_server = oip_grpc.server(app, args.host, args.grpc_port, limits(args))
        await grpc_server.start()
        server = await http11.serve(app, error, http, limits(args), http11.Tally(metric.connections))
        if args.control:
            following = loop.create_task(control.follow(args.control, repo, load))
            following.add_done_callback(lambda t: t.cancelled() or t.exception() and stop.set())
        repo.ready = True
        announce()
        await stop.wait()
        repo.ready = False  # probes see it first; then no new connections, and what is queued is answered
        server.close()
        deadline = loop.time() + STOP_GRACE_S / 2
        while any(s.batcher.queued or s.metrics.active for s in repo.served()) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await grpc_server.stop(grace=1)
        for s in repo.served():
            await s.batcher.stop()
        tracing.shutdown()  # what is still buffered goes to the collector

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:  # pragma: no cover - asyncio's own loop works too, slower
        asyncio.run(main())
    return 0


def limits(args: argparse.Namespace) -> Limits:
    return Limits(**{f.name: getattr(args, f.name) for f in fields(Limits)})


# The supervisor: the ports, the workers, and a replacement for each that dies.


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def tcp_socket(host: str, *, share: bool) -> socket.socket:
    """SO_REUSEADDR on every socket we bind: the connections our last run closed sit in TIME_WAIT on its ports for a
    minute, and a restart must not wait for them. SHARE: join the port's SO_REUSEPORT group of our workers."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if share:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def hold_port(host: str, port: int, what: str) -> socket.socket:
    """Refuse a port something else holds (SO_REUSEPORT would otherwise quietly join another server's), then keep it
    bound, not listening, for our workers alone: they share it through SO_REUSEPORT."""
    probe = tcp_socket(host, share=False)
    try:
        probe.bind((host, port))
    except OSError as e:
        raise SystemExit(f"cannot use {host}:{port} for {what}: {e.strerror}") from None
    finally:
        probe.close()
    guard = tcp_socket(host, share=True)
    guard.bind((host, port))
    return guard


def listening_socket(host: str, port: int) -> socket.socket:
    """A worker's own REST socket in the port's SO_REUSEPORT group; it listens once the server starts on it."""
    sock = tcp_socket(host, share=True)
    sock.bind((host, port))
    return sock


@dataclass
class Worker:
    proc: subprocess.Popen
    ready_pipe: int
    started: float = field(default_factory=time.time)
    ready: bool = False
    warmup: dict = field(default_factory=dict)


class Supervisor:
    def __init__(self, args: argparse.Namespace):
        self.args, self.workers, self.stopping, self.restarts, self.failures = args, [], False, 0, 0
        self.guards = [hold_port(args.host, args.http_port, "REST"), hold_port(args.host, args.grpc_port, "gRPC")]
        self.metrics_dir = tempfile.mkdtemp(prefix="torchship-metrics-")
        self.selector = selectors.DefaultSelector()
        self.control = None

    def open_repository(self):
        """The repository as the flags give it, saved for the workers, and the control socket they follow."""
        from . import control
        from .repository import RepositoryError

        args = self.args
        try:
            aliases = served_names(args)
            state = control.initial_state(args.model_dir, args.backend, aliases)
        except RepositoryError as e:
            raise SystemExit(str(e)) from None
        for name, m in state.models.items():
            for v, spec in m.versions.items():
                if not spec.proven:
                    logger.warning("%s version %s is served as asked, but unproven: %s", name, v, spec.reason)
        args.repository_state = str(Path(self.metrics_dir) / "repository.json")
        state.save(args.repository_state)
        args.control = str(Path(self.metrics_dir) / "control.sock")
        args.admin_token_file = args.admin_token_file or str(Path(self.metrics_dir) / "admin-token")
        control.write_token(args.admin_token_file)
        self.control = control.Supervisor(
            args.control, args.repository_state, sources=args.model_dir, backend=args.backend, aliases=aliases
        )
        return state

    def spawn(self) -> Worker:
        read, write = os.pipe()
        argv = [
            sys.executable,
            "-m",
            f"{__package__}.oip_server",
            *worker_argv(self.args),
            "--worker",
            "--ready_fd",
            str(write),
        ]
        env = {**os.environ, metrics.MULTIPROCESS_ENV: self.metrics_dir}
        proc = subprocess.Popen(argv, pass_fds=(write,), env=env, stdin=subprocess.DEVNULL)
        os.close(write)
        os.set_blocking(read, False)
        w = Worker(proc, read)
        self.selector.register(read, selectors.EVENT_READ, w)
        self.workers.append(w)
        return w

    def reap(self, w: Worker) -> None:
        self.selector.unregister(w.ready_pipe)
        os.close(w.ready_pipe)
        self.workers.remove(w)
        metrics.forget(w.proc.pid, self.metrics_dir)
        if self.control:
            self.control.forget(w.proc.pid)

    def write_status(self) -> None:
        if not self.args.status_file:
            return
        state = {
            "pid": os.getpid(),
            "http_port": self.args.http_port,
            "grpc_port": self.args.grpc_port,
            "restarts": self.restarts,
            "settings": {k: getattr(self.args, k) for k in SETTINGS},
            "admin_token_file": self.args.admin_token_file,
            "models": self.control.index_all() if self.control else [],
            "workers": [
                {"pid": w.proc.pid, "ready": w.ready, "started": w.started, "warmup": w.warmup} for w in self.workers
            ],
        }
        tmp = Path(f"{self.args.status_file}.tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.args.status_file)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.stop)
        models = ", ".join(f"{r['name']} {r['version']}" for r in self.control.index_all())
        logger.info(
            "serving %s from %s: %d workers, batches of up to %d rows (wait %g ms for company on its way), "
            "%d thread(s) each, %d requests queued per worker at most; the repository calls' admin token is in "
            "%s",
            models,
            ", ".join(self.args.model_dir),
            self.args.workers,
            self.args.max_batch,
            self.args.max_delay_ms,
            self.args.threads,
            self.args.max_queue,
            self.args.admin_token_file,
        )
        for _ in range(self.args.workers):
            self.spawn()
        self.write_status()
        announced = False
        while not self.stopping:
            for key, _ in self.selector.select(timeout=0.2):
                w = key.data
                try:
                    line = os.read(key.fd, 4096)
                except BlockingIOError:
                    continue
                if line and not w.ready:
                    w.ready, w.warmup, self.failures = True, json.loads(line.splitlines()[0]).get("warmup", {}), 0
                    self.write_status()
            if not announced and self.workers and all(w.ready for w in self.workers):
                announced = True
                logger.info(
                    "ready: %d workers answer REST on %s:%d and gRPC on %s:%d (warm-up: batch %s in %s ms)",
                    len(self.workers),
                    self.args.host,
                    self.args.http_port,
                    self.args.host,
                    self.args.grpc_port,
                    self.workers[0].warmup.get("batch"),
                    self.workers[0].warmup.get("ms"),
                )
            for w in [w for w in self.workers if w.proc.poll() is not None]:
                if self.stopping:
                    break
                code = w.proc.returncode
                self.reap(w)
                self.failures += not w.ready
                if self.failures >= GIVE_UP_AFTER or not announced and not w.ready:
                    logger.error("worker %d exited with %s before it was ready: giving up", w.proc.pid, code)
                    self.stop()
                    return 3
                self.restarts += 1
                logger.warning("worker %d exited with %s: starting another", w.proc.pid, code)
                self.spawn()
                self.write_status()
        return 0

    def stop(self, *_) -> None:
        if self.stopping:
            return
        self.stopping = True
        for w in self.workers:
            if w.proc.poll() is None:
                w.proc.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for w in self.workers:
            try:
                w.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
        if self.control:
            self.control.close()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        if self.args.status_file:
            Path(self.args.status_file).unlink(missing_ok=True)


LIMITS = tuple(f.name for f in fields(Limits))
SETTINGS = ("workers", "max_batch", "max_delay_ms", "threads", "max_queue", "backend", *LIMITS)


def worker_argv(args: argparse.Namespace) -> list[str]:
    keep = (
        "host",
        "http_port",
        "grpc_port",
        "backend",
        "workers",
        "max_batch",
        "max_delay_ms",
        "threads",
        "max_queue",
        "max_pixels",
        "log_level",
        "control",
        "repository_state",
        "admin_token_file",
        "access_log",
        *LIMITS,
    )
    flags = [f"--{k}={getattr(args, k)}" for k in keep if not isinstance(getattr(args, k), bool)]
    switches = [f"--{k}" for k in keep if getattr(args, k) is True]
    return [*(f"--model_dir={d}" for d in args.model_dir), *flags, *switches]


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        stream=sys.stdout,
    )
    logging.getLogger("torchship.access").setLevel(logging.INFO if args.access_log else logging.WARNING)
    if args.worker:
        return worker(args)
    try:
        if not ipaddress.ip_address(args.host).is_loopback:
            logger.warning(
                "listening on %s: the Open Inference Protocol has no authentication of its own; put an "
                "authenticating proxy in front (README, 'Serve over the Open Inference Protocol')",
                args.host,
            )
    except ValueError:
        pass
    supervisor = Supervisor(args)  # the ports first: a taken one fails before a second is spent measuring
    complete(args, supervisor.open_repository())
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
