"""One worker of the OIP server: the repository's models loaded and warm, a batcher each, REST and gRPC on one event
loop, and the supervisor's changes to the repository followed as they come.

python -m torchship.handlers.oip.worker ASSIGNMENT_JSON   (the supervisor starts it; nobody else needs to)
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from . import http11, metrics, served, tracing
from .admin import Admin, read_token
from .config import LOG_FORMAT, Assignment, Config, ConfigError
from .grpc import server as grpc_server
from .handoff import Handoff
from .pipeline import Pipeline
from .repository import Model, Repository, State
from .rest import RestApp, error
from .shm import Regions
from .slots import NONE, Slots
from .sockets import SHARES, Shares

logger = logging.getLogger("torchship.oip")
STOP_GRACE_S = 10  # a stopping worker answers what it holds for at most half of this, the supervisor waits the rest


def loader(config: Config, slots: Slots = NONE, mapped_dir: Path | None = None, *, proves: bool = True) -> Callable:
    """(name, export directory, the model's overrides) -> the version loaded and warm at the largest batch, or the
    error that stops it. SLOTS: the server's forward passes at once, which every model's passes take. MAPPED_DIR:
    where large ONNX models are kept optimized once for every worker's sessions to map (model/mapped.py). PROVES:
    this worker's warm-up runs the full batch even for a heavy model (served.warm_up)."""

    def load(name: str, directory: str, overrides: dict | None = None) -> served.Served:
        version = served.load(
            directory, config, name=name, overrides=overrides or {}, slots=slots, mapped_dir=mapped_dir
        )
        try:
            served.warm_up(version, proves=proves)
        except Exception as e:  # a model that cannot run a full batch must never take traffic
            detail = str(e).splitlines()[0][:300] if str(e) else ""
            raise RuntimeError(
                f"warm-up: a batch of {config.max_batch} failed ({type(e).__name__}: {detail}); --max_batch lower?"
            ) from None
        return version

    return load


def repository(state: State, load: Callable) -> Repository:
    """Every version STATE names, loaded and warm, routed as it says."""
    repo = Repository(state)
    repo.models = {
        name: Model(name, {v: load(name, spec.directory, m.overrides) for v, spec in m.versions.items()}, m.route)
        for name, m in state.models.items()
    }
    return repo


def serve(repo: Repository, job: Assignment, load: Callable, announce: Callable[[], object]) -> int:
    """REST and gRPC over a loaded, warm repository until SIGTERM, following the supervisor's changes to it (CONTROL:
    its socket); `announce` once both listen."""
    config, control = job.config, job.control
    tracing.STAGES = config.trace_stages
    http = socket.socket(fileno=job.http_fd)  # the supervisor's listening sockets, shared by every worker
    grpc_listener = socket.socket(fileno=job.grpc_fd)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        for s in repo.served():
            s.batcher.start()
        regions = Regions()  # the shared memory clients registered, as the supervisor says (shm.py)
        pipeline = Pipeline(repo, config, Admin(read_token(config.admin_token_file), control), regions)
        shares = Shares(Path(job.state_file).with_name(SHARES), config.workers, job.index) if job.state_file else None

        def held() -> int:  # what the other workers compare their connections with
            return rest.open + calls.open

        def counted(open_: int, paused: int) -> None:
            if shares is not None:
                shares.set(held())

        def counted_rest(open_: int, paused: int) -> None:
            metrics.connections(open_, paused)
            counted(open_, paused)

        rest, calls = http11.Tally(counted_rest), http11.Tally(counted)
        handoff = None
        if job.state_file and config.workers > 1:  # a connection's calls shared with the other workers
            handoff = Handoff(Path(job.state_file).parent, config.workers, job.index, metrics.handed)
            await handoff.start()
        grpc = grpc_server(pipeline, config, calls, handoff)
        grpc.start(grpc_listener, shares, held)
        server = http11.serve(RestApp(pipeline), error, http, config.limits, rest, shares, held)
        if control:
            following = loop.create_task(follow(control, repo, load, regions))
            following.add_done_callback(lambda t: t.cancelled() or t.exception() and stop.set())
        repo.ready = True
        announce()
        await stop.wait()
        repo.ready = False  # probes see it first; then no new connections, and what is queued is answered
        server.close()
        grpc.close()  # GOAWAY: its clients open their next calls on another worker
        deadline = loop.time() + STOP_GRACE_S / 2
        while any(s.batcher.queued or s.metrics.active for s in repo.served()) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await grpc.stop(grace=1)
        for s in repo.served():
            await s.batcher.stop()
        tracing.shutdown()  # what is still buffered goes to the collector

    try:
        import uvloop  # optional: asyncio's own loop works too, slower (bench/NOTES.md, lever 38)

        uvloop.run(main())
    except ImportError:  # pragma: no cover
        asyncio.run(main())
    return 0


async def follow(path: str, repo: Repository, load: Callable, regions: Regions) -> None:
    """Say hello to the supervisor, then do what it says until it hangs up (control.py has the other side). LOAD runs
    on a thread of its own, so that serving goes on meanwhile."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(json.dumps({"hello": {"pid": os.getpid(), "generation": repo.generation}}).encode() + b"\n")
    staged: dict[tuple[str, str], served.Served] = {}
    while line := await reader.readline():
        command = json.loads(line)
        op = command.get("op")
        try:
            if op == "stage":
                key = (command["model"], command["version"])
                overrides = command.get("overrides") or {}
                staged[key] = await loop.run_in_executor(None, load, command["model"], command["dir"], overrides)
                reply = {"ok": True, "warmup": staged[key].warmup}
            elif op == "commit":
                await apply(repo, State.from_json(json.dumps(command["state"])), staged, load)
                staged.clear()
                reply = {"ok": True}
            elif op == "abort":
                staged.clear()
                reply = {"ok": True}
            elif op == "shm":
                regions.apply(command["regions"])
                reply = {"ok": True}
            else:
                reply = {"ok": False, "error": f"unknown command {op!r}"}
        except Exception as e:  # a version that cannot load or warm up: the supervisor hears why
            detail = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            logger.error("%s failed: %s", op, detail)
            reply = {"ok": False, "error": detail}
        writer.write(json.dumps(reply).encode() + b"\n")
        await writer.drain()


async def apply(repo: Repository, state: State, staged: dict, load: Callable) -> None:
    """Switch this worker to STATE in one assignment: versions it holds are kept, staged ones start, any other is
    loaded first; versions no longer in STATE answer what they hold, then are freed."""
    loop = asyncio.get_running_loop()
    held = {(s.name, s.version): s for s in repo.served()}
    models = {}
    for name, m in state.models.items():
        versions = {}
        for v, spec in m.versions.items():
            s = held.get((name, v))
            if s is None or s.directory != spec.directory or s.overrides != m.overrides:
                s = staged.pop((name, v), None) or await loop.run_in_executor(
                    None, load, name, spec.directory, m.overrides
                )
            versions[v] = s
        models[name] = Model(name, versions, m.route)
    kept = {id(s) for m in models.values() for s in m.versions.values()}
    for m in models.values():
        for s in m.versions.values():
            if not s.batcher.started:
                s.batcher.start()
    retired = [s for s in held.values() if id(s) not in kept]
    repo.models, repo.generation, repo.state = models, state.generation, state
    for s in retired:
        task = loop.create_task(s.retire())
        RETIRING.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(RETIRING.discard)


RETIRING: set = set()


def main(argv: list[str]) -> int:
    try:
        job = Assignment.from_json(argv[0])
    except (IndexError, ValueError, KeyError, TypeError, ConfigError) as e:
        raise SystemExit(f"a worker is started by the supervisor with its assignment as JSON ({e})") from None
    config = job.config
    logging.basicConfig(level=config.log_level, format=LOG_FORMAT, stream=sys.stdout)
    logging.getLogger("torchship.access").setLevel(logging.INFO if config.access_log else logging.WARNING)
    limited = config.adapts or 0 < config.pass_slots < config.workers  # else a worker always finds one: no lock
    slots = Slots(Path(job.state_file).with_name("pass-slot"), config.pass_slots) if limited else NONE
    load = loader(config, slots, job.mapped_dir, proves=job.index == 0)  # the first worker proves a full batch
    try:
        repo = repository(State.load(job.state_file), load)
    except Exception as e:
        logger.error("%s; this worker will not serve", str(e).splitlines()[0][:400] if str(e) else type(e).__name__)
        return 3
    ready = json.dumps({"pid": os.getpid(), "warmup": next(s.warmup for s in repo.served())}) + "\n"
    return serve(repo, job, load, lambda: os.write(job.ready_fd, ready.encode()))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
