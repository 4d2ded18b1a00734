"""How many workers, how big a batch, how long a wait: one rule from the model's measured cost, for both runtimes.

TorchServe's model-config.yaml (`torchship archive`), the Open Inference Protocol server and the Kubernetes bundle
all call sized(measure(...)); every choice also has a flag. Why these numbers: bench/NOTES.md (levers 17, 28, 35).
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from .card import ModelCard
from .formats import FORMAT_BY_BACKEND
from .limits import MAX_REQUEST_BYTES
from .model import runners
from .model.mapped import cpu, fingerprint
from .model.named import zeros

BATCH_BUDGET_MS = 50  # a full batch should take about this long, so a queued request waits at most ~2 of them
# A model this slow at batch 1 on one thread is heavy: the server's own ~1 ms a request is under 5 % of it, and what
# counts is keeping every core in each pass (bench/NOTES.md, lever 59)
HEAVY_MS = 20
MAX_BATCH = 8  # beyond this a 2-core machine gains nothing (bench/NOTES.md, lever 5)
MAX_QUEUE = 1024


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers() -> int:
    """Two workers at least, so a worker's crash or restart never leaves the model without one (bench/NOTES.md)."""
    return max(2, cores() // 2)


def max_workers() -> int:
    """More single-threaded workers than twice the cores only queue behind each other and starve the server."""
    return max(2, 2 * cores())


def memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def queue_size(max_request_bytes: int = MAX_REQUEST_BYTES) -> int:
    """Queue a few hundred clients (TorchServe's 100 turns the 101st away with a 503), but never more request bodies
    than a quarter of this machine's memory could hold at the largest request size."""
    return int(min(MAX_QUEUE, max(100, memory_bytes() // 4 // max_request_bytes)))


@dataclass(frozen=True)
class Cost:
    """What one forward pass of the exported model costs on this machine, measured with one thread."""

    batch1_ms: float
    batch8_ms: float  # 0: not run, a heavy model's, whose batch of 8 the caller runs before it serves (measure())
    # False: the graph takes one image a pass (a detector: model/vision.py), so a batch only waits for company it
    # cannot share a pass with (at c=16, batch 8 gave 0.88 of batch 1's images a second: bench/NOTES.md lever 61)
    batches: bool = True
    model_bytes: int = 0  # the model file and any ONNX external data
    # what loading one session added to the process's resident memory: 2.6x the file for ResNet-50 (its convolutions'
    # weights kept twice, as given and reordered), 1.3x for BERT-base (bench/NOTES.md lever 76); 0: not measured
    session_bytes: int = 0
    # ONNX Runtime sets threads per session, so a worker can hold a busy one beside its lone pass's (oip/slots.py);
    # torch sets them per process
    threads_by_session: bool = True

    @property
    def per_image_batched_ms(self) -> float:
        return self.batch8_ms / 8


@dataclass(frozen=True)
class Sizing:
    workers: int
    max_batch: int  # images (or rows) in one forward pass
    max_batch_delay_ms: int  # the longest a batch waits for company that is on its way
    threads: int  # intra-op threads per worker
    timeout_s: int  # a request that waits longer has failed
    pass_slots: int = 0  # forward passes at once over all workers (oip/slots.py); the workers' count: no limit
    # a pass's threads when another is running: fewer than THREADS, a heavy model's lone pass takes every core and its
    # passes under load one each (oip/slots.py, bench/NOTES.md lever 64); 0: THREADS
    busy_threads: int = 0

    @property
    def split_threads(self) -> int:
        """Threads per worker for a runtime whose workers can neither take turns nor change threads by the pass
        (TorchServe): the cores the rule keeps busy at once, split between them."""
        if 0 < self.busy_threads < self.threads:
            return self.busy_threads
        return max(1, self.threads * min(self.pass_slots, self.workers) // self.workers)


def measure(
    model_dir: Path | str,
    backend: str,
    card: ModelCard,
    seconds: float = 0.5,
    mapped_dir: Path | None = None,
    *,
    heavy_batch8: bool = True,
) -> Cost:
    """Median forward time at batch 1 and 8 with one thread: what a single-threaded worker will see; and the memory
    its session holds (MAPPED_DIR: loaded as the workers will, from an optimized copy kept there). HEAVY_BATCH8
    False: a heavy model's batch of 8 is not run, for a caller that runs one before it serves anyway (the OIP
    workers' warm-up); the rule reads only its batch-1 figure (BERT-base: ~2 s of a first start, bench/NOTES.md
    lever 86)."""
    file = FORMAT_BY_BACKEND[backend]
    if file.onnxruntime:  # the runtime's own import is not the session's memory; heavy, so imported only here
        import onnxruntime  # noqa: F401
    before = resident_bytes()
    run = runners.load(model_dir, backend, threads=1, card=card, mapped_dir=mapped_dir).run
    session = max(0, resident_bytes() - before)
    out = passes(run, card, seconds, heavy_batch8=heavy_batch8)
    del run
    release_freed_memory()
    weights = sum(f.stat().st_size for f in Path(model_dir).glob(f"{file.file}*"))
    return Cost(
        out[1],
        out[8],
        batches=card.task != "detect",
        model_bytes=weights,
        session_bytes=session,
        threads_by_session=file.onnxruntime,
    )


MEASURED = "measured"  # the cache folder's part holding measured costs, one JSON file a model file and machine


def measured(
    model_dir: Path | str, backend: str, card: ModelCard, *, cache: Path | None, mapped_dir: Path | None = None
) -> tuple[Cost, str]:
    """measure()'s cost, a heavy model's batch of 8 left to the workers' warm-up, and where it came from: read from
    CACHE when this model file was measured on this machine before, so that a restart of a heavy model skips its
    measuring passes (BERT-base: ~4 s, bench/NOTES.md lever 82)."""
    if cache is None:
        return measure(model_dir, backend, card, mapped_dir=mapped_dir, heavy_batch8=False), "measured"
    file = FORMAT_BY_BACKEND[backend]
    path = Path(model_dir) / file.file
    runtime = "onnxruntime" if file.onnxruntime else "torch"
    try:
        runtime += " " + version(runtime)
    except PackageNotFoundError:
        pass
    kept = cache / MEASURED / f"{fingerprint(path, backend, runtime, cpu(), str(cores()))}.json"
    try:
        return Cost(**json.loads(kept.read_text())), f"read from {kept}"
    except (OSError, ValueError, TypeError):
        pass  # not measured here yet, or unreadable: measured again
    cost = measure(model_dir, backend, card, mapped_dir=mapped_dir, heavy_batch8=False)
    try:
        kept.parent.mkdir(parents=True, exist_ok=True)
        making = kept.with_name(f".{kept.name}.{os.getpid()}")
        making.write_text(json.dumps(asdict(cost)))
        os.replace(making, kept)  # another server reading it sees the whole file or none
    except OSError as e:
        return cost, f"measured (not kept: {e})"
    return cost, f"measured, kept in {kept}"


def zero_input(card: ModelCard, rows: int):
    """ROWS of the model's input, named dimensions at their longest: what the largest request of ROWS costs."""
    return zeros(card.signature, rows) if card.named else np.zeros((rows, *card.input_shape), np.float32)


LONG_PASS_S = 0.25  # a pass this long is timed once, not three times: BERT-base's 8 rows take ~2.2 s on one thread


def passes(run, card: ModelCard, seconds: float, *, heavy_batch8: bool = True) -> dict[int, float]:
    """Median ms of a pass at batch 1 and 8, after a pass each that warms the session; a heavy model's batch of 8
    unwarmed: the rule uses only its batch-1 figure, and a warm session's first batch of 8 is within 7 % of its next
    (BERT-base: ~2 s of a first start saved, bench/NOTES.md lever 85); not run at all (0) unless HEAVY_BATCH8."""
    out = {}
    for n in (1, 8):  # named inputs at their longest: what the largest request costs
        if n == 8 and out[1] >= HEAVY_MS and not heavy_batch8:
            out[n] = 0.0
            break
        x = zero_input(card, n)
        if n == 1 or out[1] < HEAVY_MS:
            run(x)
        times, start = [], time.perf_counter()
        while len(times) < (1 if times and times[0] >= LONG_PASS_S else 3) or (
            time.perf_counter() - start < seconds and len(times) < 200
        ):
            t = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - t)
        out[n] = float(np.median(times)) * 1000
    return out


def release_freed_memory() -> None:
    """glibc keeps a freed session's heap (ResNet-50's: 240 MB in the supervisor for its whole life) unless asked to
    give it back (bench/NOTES.md, lever 77); elsewhere nothing to do."""
    gc.collect()  # a runner caught in a reference cycle is freed now, not at some later collection
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resident_bytes() -> int:
    """This process's resident memory now (Linux's /proc), 0 where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def sized(cost: Cost, workers: int | None = None) -> Sizing:
    """Batching, delay, timeout and threads from the model's measured cost instead of the digit model's. A heavy
    model: every core in a pass that runs alone, its share of them in each of the passes that run at once where a
    second session a worker can run it and fits in memory (oip/slots.py; else the workers take turns), batches up to
    MAX_BATCH (ResNet-50 here: batch 4-8 gives 3-5 % more images a second than 1). Otherwise a thread per worker and
    batches that take about BATCH_BUDGET_MS."""
    workers = workers or default_workers()
    delay = int(np.clip(round(cost.batch1_ms / 10), 1, 20))  # waiting for company costs at most a tenth of a pass
    if cost.batch1_ms >= HEAVY_MS:
        threads, batch = cores(), MAX_BATCH if cost.batches else 1
        second = cost.threads_by_session and busy_session_fits(max(cost.model_bytes, cost.session_bytes), workers)
        busy = max(1, cores() // workers) if second else threads
    else:  # the fast models only pay fork/join for more threads (bench/NOTES.md, lever 25)
        threads = busy = 1
        batch = int(np.clip(BATCH_BUDGET_MS // max(cost.per_image_batched_ms, 1e-3), 1, MAX_BATCH))
        batch = batch if cost.batches else 1
    timeout = max(30, math.ceil(cost.batch1_ms * batch * 20 / 1000))
    return Sizing(
        workers=workers,
        max_batch=batch,
        max_batch_delay_ms=delay,
        threads=threads,
        timeout_s=timeout,
        pass_slots=pass_slots(workers, threads, busy),
        busy_threads=busy,
    )


def busy_session_fits(session_bytes: int, workers: int) -> bool:
    """A busy session beside the lone pass's doubles every worker's model (oip/slots.py): only while all of them
    stay within half of this machine's memory."""
    return 2 * workers * session_bytes <= memory_bytes() // 2


def pass_slots(workers: int, threads: int, busy_threads: int = 0) -> int:
    """Forward passes at once over all workers: as many as the cores hold at BUSY_THREADS (else THREADS) each, where
    workers of several threads would otherwise oversubscribe them (12 % fewer ResNet-50 images a second:
    bench/NOTES.md, lever 59); else every worker's (no turns: single-threaded workers were measured without them)."""
    each = busy_threads or threads
    return max(1, cores() // each) if threads > 1 and threads * workers > cores() else workers
