"""The OIP server's supervisor: it holds the ports, decides what the configuration leaves open (from one measured
pass), starts the workers with the completed configuration, replaces any that dies, and keeps the repository's state
and the admin calls that change it (control.py)."""

from __future__ import annotations

import json
import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .. import sizing
from ..card import ModelCard
from ..model.mapped import prepare
from . import metrics
from .admin import write_token
from .config import Assignment, Config, mapped_dir
from .control import ControlPlane, initial_state
from .repository import RepositoryError, State, exports_below
from .sockets import GONE, SHARES, Shares, shared_listener

logger = logging.getLogger("torchship.oip")
GIVE_UP_AFTER = 3  # a worker that dies this many times in a row before it is ready will not come up: stop
STOP_GRACE_S = 10


def served_names(config: Config) -> dict[str, str]:
    """model_name: the one model of the first model_dir served under that name (served name -> card name)."""
    if not config.model_name:
        return {}
    names = {e.name for e in exports_below(config.model_dirs[0], config.backend)}
    if len(names) != 1:
        raise RepositoryError(f"--model_name names one model; {config.model_dirs[0]} holds {len(names)}")
    return {config.model_name: names.pop()}


def complete(config: Config, state: State, mapped: Path | None = None) -> Config:
    """Every choice the configuration leaves open, decided once by the shared sizing rule from a measured pass (of
    the model as the workers will load it: from MAPPED, when its optimized copy is kept there)."""
    workers = config.workers or sizing.default_workers()
    config = replace(config, workers=workers, max_queue=config.max_queue or sizing.queue_size(config.limits.max_body))
    if config.decided:
        busy = config.busy_threads or config.threads
        return replace(
            config, busy_threads=busy, pass_slots=config.pass_slots or sizing.pass_slots(workers, config.threads, busy)
        )
    first = next(iter(state.models.values()))  # one setting for every model: the first one's measured cost
    export = first.versions[first.route.default].directory
    try:
        cache = Path(config.cache_dir) if config.cache_dir else None
        cost, source = sizing.measured(export, config.backend, ModelCard.load(export), cache=cache, mapped_dir=mapped)
    except Exception as e:  # a model that fails here fails in every worker: say so once, plainly
        detail = str(e).splitlines()[0][:200] if str(e) else ""
        raise SystemExit(
            f"measuring {export}'s passes failed ({type(e).__name__}: {detail}); give --max_batch, "
            "--max_batch_delay_ms and --threads to skip the measurement"
        ) from None
    sized = sizing.sized(cost, workers)
    batch8 = f"{cost.batch8_ms:.2f} at batch 8" if cost.batch8_ms else "batch 8 left to the workers' warm-up"
    logger.info(
        "%s: %.2f ms at batch 1, %s (one thread); a session holds %.0f MB (%s)",
        export,
        cost.batch1_ms,
        batch8,
        cost.session_bytes / 2**20,
        source,
    )
    threads = config.threads or sized.threads
    busy = config.busy_threads or (threads if config.threads else sized.busy_threads)  # threads given: one session
    return replace(
        config,
        max_batch=config.max_batch or sized.max_batch,
        max_batch_delay_ms=config.max_batch_delay_ms if config.max_batch_delay_ms >= 0 else sized.max_batch_delay_ms,
        threads=threads,
        busy_threads=busy,
        pass_slots=config.pass_slots or sizing.pass_slots(workers, threads, busy),
    )


def premap(state: State, backend: str, into: Path | None) -> None:
    """Every large ONNX model the workers will load at start, optimized once here for all of them to map."""
    for m in state.models.values():
        for spec in m.versions.values():
            prepare(spec.directory, backend, into)
    sizing.release_freed_memory()  # the optimizing session's heap: this process only routes from now on


@dataclass
class Worker:
    proc: subprocess.Popen
    ready_pipe: int
    index: int  # its place in the connection counts, taken over by its replacement
    started: float = field(default_factory=time.time)
    ready: bool = False
    warmup: dict = field(default_factory=dict)


class Supervisor:
    def __init__(self, config: Config):
        self.config, self.workers, self.stopping, self.restarts, self.failures = config, [], False, 0, 0
        # the ports first: a taken one fails before a second is spent measuring
        self.http = shared_listener(config.host, config.http_port, "REST")
        self.shares: Shares | None = None  # each worker's REST connections, once the worker count is decided
        self.grpc = shared_listener(config.host, config.grpc_port, "gRPC")
        self.work_dir = tempfile.mkdtemp(prefix="torchship-oip-")  # metrics, the saved state, the control socket
        self.state_file = str(Path(self.work_dir) / "repository.json")
        self.mapped = mapped_dir(config, self.state_file)  # large models optimized once, for every session to map
        self.control_path = str(Path(self.work_dir) / "control.sock")
        self.selector = selectors.DefaultSelector()
        self.control: ControlPlane | None = None

    def open_repository(self) -> State:
        """The repository as the configuration gives it, saved for the workers, and the control plane they follow."""
        config = self.config
        try:
            aliases = served_names(config)
            state = initial_state(list(config.model_dirs), config.backend, aliases)
        except RepositoryError as e:
            raise SystemExit(str(e)) from None
        for name, m in state.models.items():
            for v, spec in m.versions.items():
                if not spec.proven:
                    logger.warning("%s version %s is served as asked, but unproven: %s", name, v, spec.reason)
        state.save(self.state_file)
        token_file = config.admin_token_file or str(Path(self.work_dir) / "admin-token")
        write_token(token_file)
        self.config = replace(config, admin_token_file=token_file)
        self.control = ControlPlane(
            self.control_path,
            self.state_file,
            sources=list(config.model_dirs),
            backend=config.backend,
            aliases=aliases,
            allow_shm=config.allow_client_shm,
            mapped_dir=self.mapped,
        )
        return state

    def spawn(self, index: int) -> Worker:
        read, write = os.pipe()
        listening = (self.http.fileno(), self.grpc.fileno())
        job = Assignment(self.config, self.state_file, self.control_path, write, *listening, index=index)
        argv = [sys.executable, "-m", f"{__package__}.worker", job.to_json()]
        env = {**os.environ, metrics.MULTIPROCESS_ENV: self.work_dir}
        proc = subprocess.Popen(argv, pass_fds=(write, *listening), env=env, stdin=subprocess.DEVNULL)
        os.close(write)
        os.set_blocking(read, False)
        w = Worker(proc, read, index)
        self.selector.register(read, selectors.EVENT_READ, w)
        self.workers.append(w)
        return w

    def reap(self, w: Worker) -> None:
        self.selector.unregister(w.ready_pipe)
        os.close(w.ready_pipe)
        self.workers.remove(w)
        if self.shares is not None:
            self.shares.set(GONE, w.index)  # until its replacement counts its own
        metrics.forget(w.proc.pid, self.work_dir)
        if self.control:
            self.control.forget(w.proc.pid)

    def write_status(self) -> None:
        """The supervisor's account, for `torchship serve status`: the configuration every worker runs with, the
        repository, and each worker."""
        config = self.config
        if not config.status_file:
            return
        state = {
            "pid": os.getpid(),
            "http_port": config.http_port,
            "grpc_port": config.grpc_port,
            "restarts": self.restarts,
            "settings": config.to_dict(),
            "admin_token_file": config.admin_token_file,
            "models": self.control.index_all() if self.control else [],
            "workers": [
                {"pid": w.proc.pid, "ready": w.ready, "started": w.started, "warmup": w.warmup} for w in self.workers
            ],
        }
        tmp = Path(f"{config.status_file}.tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(config.status_file)

    def run(self) -> int:
        """Open the repository, complete the configuration, start the workers and keep them: until SIGTERM."""
        try:
            state = self.open_repository()
            premap(state, self.config.backend, self.mapped)
            self.config = complete(self.config, state, self.mapped)
        except BaseException:
            self.cleanup()
            raise
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.stop)
        config = self.config
        models = ", ".join(f"{r['name']} {r['version']}" for r in self.control.index_all())
        logger.info("serving %s from %s: %s", models, ", ".join(config.model_dirs), config.summary())
        logger.info("configuration: %s", config.to_json())
        logger.info("the repository calls' admin token is in %s", config.admin_token_file)
        self.shares = Shares(Path(self.work_dir) / SHARES, config.workers)
        for i in range(config.workers):
            self.shares.set(GONE, i)  # until the worker counts its own: none defers to one not yet serving
            self.spawn(i)
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
                first = self.workers[0].warmup
                logger.info(
                    "ready: %d workers answer REST on %s:%d and gRPC on %s:%d (warm-up: batch %s in %s ms)",
                    len(self.workers),
                    config.host,
                    config.http_port,
                    config.host,
                    config.grpc_port,
                    first.get("batch"),
                    first.get("ms"),
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
                self.spawn(w.index)
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
        self.cleanup()

    def cleanup(self) -> None:
        if self.control:
            self.control.close()
        shutil.rmtree(self.work_dir, ignore_errors=True)
        if self.config.status_file:
            Path(self.config.status_file).unlink(missing_ok=True)
