"""One request path for every transport. REST and gRPC (and any transport added later) turn bytes into a call of
this module and its answer back into bytes; everything in between happens here, once: the repository lookup and
route (default, canary, shadow), admission (a full decode pool or queue is a 503), decoding inline or on the pool,
batching, the shadow's comparison, metrics, the trace and the access log.

An inference request is a `Flight`: `Pipeline.begin` looks its model up and starts its clock, `decode` runs the
transport's decoder (inline when the request is small, else on the worker's decode pool), `enqueue` hands its rows to
the batcher, and `finish` records how it ended, once. The REST side stays callback-driven, which is what keeps it at
~0.07 ms of HTTP core a request (bench/NOTES.md lever 38): a Flight costs no task and no await of its own.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version

from ..model.errors import InputError
from ..protocol import triton
from ..protocol.v2 import ProtocolError
from . import metrics, tracing
from .admin import Admin
from .batching import Overloaded
from .config import Config
from .repository import Repository, RepositoryError, agreement
from .served import Served
from .shm import Regions

logger = logging.getLogger("torchship.oip")
ACCESS = logging.getLogger("torchship.access")  # one line per inference request, when the server's access_log asks
ABANDONED = 499  # nginx's "client closed request": counted in the metrics, never sent (no one is there to read it)
DECODE_THREADS = 2  # large requests are parsed and decoded here, off the event loop; a bounded pool, a bounded queue
DECODE_INLINE_BYTES = 64 * 1024  # larger requests (photos, long JSON) are parsed and decoded in that pool
RETRY_AFTER_S = 1  # what a 503 asks the client to wait
# Triton's CUDA shared memory extension needs a GPU; torchship's servers run their models on the CPU
CUDA_SHM = "CUDA shared memory is not served: this server runs its models on the CPU"
EXTENSIONS = (
    *("binary_tensor_data", "classification", "model_repository", "model_configuration", "statistics"),
    "system_shared_memory",
)


def server_version() -> str:
    try:
        return version("torchship")
    except PackageNotFoundError:  # shipped inside an archive or a container, without torchship's metadata
        return ""


def loopback(client: str) -> bool:
    """Whether a peer as the transports name it ("127.0.0.1:5123", gRPC's "ipv4:127.0.0.1:5123", "ipv6:[::1]:5123")
    is this machine."""
    host = client.removeprefix("ipv4:").removeprefix("ipv6:").rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refusal(e: BaseException, *, log: bool = True) -> tuple[int, str]:
    """The status and message of a request that failed, whatever its transport: the client's mistakes their 4xx, a
    full worker 503, anything else a 500 whose details stay in the log."""
    if isinstance(e, (InputError, RepositoryError)):
        return e.status, str(e)
    if isinstance(e, Overloaded):
        return 503, str(e)
    if log:
        logger.error("a request failed", exc_info=e)
    return 500, f"inference failed: {type(e).__name__}"


class Pipeline:
    """A worker's one request path: the repository it serves from, the admin calls, the decode pool."""

    def __init__(self, repo: Repository, config: Config, admin: Admin, shm: Regions | None = None):
        self.repo, self.config, self.admin = repo, config, admin
        self.shm = shm or Regions()  # the shared memory regions clients registered (shm.py)
        self.version = server_version()
        self.loop = asyncio.get_running_loop()
        self.decoder = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode")  # shared by every model
        self.calls: set[asyncio.Task] = set()  # repository calls in progress (the loop keeps only weak references)

    # what every transport answers about the server and its models

    @property
    def ready(self) -> bool:
        return self.repo.ready

    def server_metadata(self) -> dict:
        return {"name": "torchship", "version": self.version, "extensions": list(EXTENSIONS)}

    def served(self, model: str, version: str | None = None) -> Served:
        """The version a request for MODEL (and VERSION) would reach; a RepositoryError (404) if none."""
        return self.repo.get(model, version)[0]

    def model_metadata(self, model: str, version: str | None = None) -> dict:
        served = self.served(model, version)
        return served.metadata(sorted(self.repo.model(served.name).versions, key=int))

    def model_config(self, model: str, version: str | None = None) -> dict:
        served = self.served(model, version)
        b = served.batcher  # the settings this version runs with: the server's, or its load's configuration
        return triton.config(
            served.card,
            served.name,
            served.metadata()["platform"],
            max_batch_delay_ms=b.max_batch_delay_ms,
            max_batch=b.max_batch,
            max_batch_size=served.max_rows,
            images=served.images,
        )

    def statistics(self, model: str | None = None, version: str | None = None) -> dict:
        """Triton's statistics extension, summed over the workers: every version of every model, of MODEL, or one
        VERSION of it (a RepositoryError, 404, for one this server does not serve)."""
        if model is None:
            versions = [(s.name, s.version) for s in self.repo.served()]
        elif version:
            served = self.served(model, version)
            versions = [(served.name, served.version)]
        else:
            versions = [(model, v) for v in sorted(self.repo.model(model).versions, key=int)]
        return {"model_stats": metrics.statistics(versions)}

    # the repository calls, behind the admin token

    def authorized(self, authorization, client: str) -> bool:
        """The admin token, or (only where the server was started with loopback_admin) a client on this machine."""
        return self.admin.allows(authorization) or (self.config.loopback_admin and loopback(client))

    def shm_status(self, name: str | None = None) -> list[dict]:
        """The system shared memory regions clients registered (all, or NAME's): [{name, key, offset, byte_size}]."""
        return self.shm.status(name)

    def index(self) -> list[dict]:
        """This worker's view of what the supervisor last committed."""
        return self.repo.index()

    def repository_call(self, op: str, model: str | None, parameters: dict, done: Callable[[dict], None]) -> None:
        """Hand a load, unload or route to the supervisor; DONE gets its answer ({"ok", "result" | "status",
        "error"}), or a 503 if the supervisor did not answer."""

        def answered(task: asyncio.Task) -> None:
            failed = task.cancelled() or task.exception() is not None
            done({"ok": False, "status": 503, "error": "the supervisor did not answer"} if failed else task.result())

        task = self.loop.create_task(self.admin.call(op, model, parameters))
        self.calls.add(task)
        task.add_done_callback(self.calls.discard)
        task.add_done_callback(answered)

    # inference

    def begin(self, protocol: str, model: str, version: str | None, *, client: str, traceparent, nbytes: int) -> Flight:
        """An inference request has arrived: its route, its clock, its trace. A RepositoryError if no model answers."""
        served, shadow = self.repo.get(model, version)
        served.metrics.started()
        trace = tracing.start(traceparent, protocol) if tracing.ENABLED else None
        return Flight(self, served, shadow, protocol, client, trace, nbytes)


class Flight:
    """One inference request from its arrival to its answer."""

    # one is made per request: no instance dict
    __slots__ = (
        "pipeline",
        "served",
        "shadow",
        "protocol",
        "client",
        "trace",
        "nbytes",
        "start",
        "status",
        "queued",
        "request_id",
        "decoded",
        "ran",
        "infer",
    )

    def __init__(self, pipeline: Pipeline, served: Served, shadow, protocol: str, client: str, trace, nbytes: int):
        self.pipeline, self.served, self.shadow, self.protocol = pipeline, served, shadow, protocol
        self.client, self.trace, self.nbytes = client, trace, nbytes
        self.start = time.perf_counter()
        self.status = 0  # how it ended, once it has
        self.queued: asyncio.Future | None = None
        self.request_id = ""  # the client's id for it (the v2 request's id, or an x-request-id header)
        self.decoded = self.ran = 0.0  # when its rows were ready, and when its pass's answer was (statistics)
        self.infer = 0.0  # how long its pass ran

    @property
    def done(self) -> bool:
        return self.status != 0

    def decode(self, work: Callable, *args, small: bool | None = True):
        """WORK(*ARGS): its value when the request is small enough to decode on the loop (an exception it raises
        propagates), else a future of it from the decode pool; an Overloaded when the pool's queue is full. SMALL
        None: whatever its size, it goes to the pool (a compressed body, say)."""
        if small and self.nbytes <= DECODE_INLINE_BYTES:
            return work(*args)
        batcher = self.served.batcher
        if batcher.decoding >= batcher.max_queue:
            raise Overloaded(f"{batcher.decoding} requests are being decoded in this worker (its limit): retry shortly")
        batcher.decoding += 1
        future = self.pipeline.loop.run_in_executor(self.pipeline.decoder, work, *args)
        future.add_done_callback(self._decoded)
        return future

    def _decoded(self, _) -> None:
        self.served.batcher.decoding -= 1

    def enqueue(self, rows, *, prompt: bool = False) -> asyncio.Future:
        """The decoded rows into the batcher (and, when the route has a shadow, a copy into the shadow's): a future of
        the request's rows of the output. PROMPT: decoded on the loop in the turn its bytes arrived, as its company
        would be (REST; a lone prompt request's pass may then run on the loop). An Overloaded if the queue is full."""
        if len(rows) > self.served.max_rows:  # a load's configuration capped it below the protocol's own limit
            raise ProtocolError(
                f"a request of {len(rows)} rows is over {self.served.name}'s max_batch_size, {self.served.max_rows}"
            )
        if self.trace is not None:
            self.trace.mark_decoded()
            self.trace.request_id = self.request_id
        self.decoded = time.perf_counter()
        self.queued = self.served.batcher.enqueue(rows, self.trace, prompt=prompt, timed=self._timed)
        self.queued.add_done_callback(self._ran)
        if self.shadow is not None:
            mirror(self.served, self.shadow, rows, self.queued)
        return self.queued

    def _ran(self, _) -> None:
        self.ran = time.perf_counter()

    def _timed(self, seconds: float) -> None:
        self.infer = seconds

    def abandon(self) -> None:
        """The client went away first: its rows leave the queue before their pass, and it is counted as abandoned."""
        if self.queued is not None:
            self.queued.cancel()
        self.finish(ABANDONED)

    def finish(self, status: int) -> bool:
        """How the request ended: metrics, trace and access log, once; False if it had already ended (an answer that
        comes after the client left, or a second one)."""
        if self.status:
            return False
        self.status = status
        now = time.perf_counter()
        served, seconds = self.served, now - self.start
        stages = (self.decoded - self.start, self.infer, now - self.ran) if self.ran else (0.0, 0.0, 0.0)
        served.metrics.answered(self.protocol, status, seconds, self.nbytes, stages)
        if self.trace is not None:
            self.trace.finish(served.name, served.version, status)
        if ACCESS.isEnabledFor(logging.INFO):
            ACCESS.info(
                "%s %s %s/%s %d %.2fms id=%s",
                self.protocol,
                self.client or "-",
                served.name,
                served.version,
                status,
                seconds * 1000,
                self.request_id or "-",
            )
        return True


def mirror(served: Served, shadow: Served, rows, answered: asyncio.Future) -> None:
    """The request's rows again, to the shadow version: its output is compared with the default's, never sent. A
    shadow whose queue is full skips the request rather than delay anyone."""
    try:
        candidate = shadow.batcher.enqueue(rows)
    except Overloaded:
        return

    def compare(_) -> None:
        if answered.cancelled() or candidate.cancelled() or answered.exception() or candidate.exception():
            return
        agreed, largest = agreement(served.card, answered.result(), candidate.result())
        metrics.shadowed(served.name, served.version, shadow.version, agreed, largest)

    gathered = asyncio.gather(answered, candidate, return_exceptions=True)
    gathered.add_done_callback(compare)
