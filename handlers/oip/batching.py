"""Dynamic batching for the Open Inference Protocol server: concurrent requests' rows, one forward pass.

One batcher per worker process, shared by REST and gRPC. Requests that arrive while a pass runs are gathered into
the next one (up to `max_batch` rows); a lone request is run at once and never waits for company. The pass runs on
one thread of its own, so the event loop goes on reading and decoding requests meanwhile (bench/NOTES.md, OIP),
except the pass of a model so fast that the hand-off costs more than it overlaps (`inline`, lever 52): a pass of
several requests, or a lone request whose protocol brings its company to the queue within the loop's turn (`prompt`).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np


class Overloaded(Exception):
    """The worker's queue is full: the client should retry later (HTTP 503 + Retry-After, gRPC UNAVAILABLE)."""


@dataclass
class Job:
    rows: np.ndarray  # this request's normalised inputs, (n, ...)
    future: asyncio.Future
    queued: float  # perf_counter() when it joined the queue
    trace: object = None  # tracing.Trace: told when its pass ran
    prompt: bool = False  # its protocol queues the requests that arrive with it in the same turn of the loop
    timed: Callable[[float], None] | None = None  # told how long its pass ran (its request's compute_infer)


@dataclass(frozen=True)
class Pass:
    """What one forward pass was, for the metrics: its size, how long it ran, how long each request had waited, and
    how long its requests' rows took to stack into one batch and to cut back out (Triton's compute_input, _output)."""

    rows: int
    seconds: float
    waits: tuple[float, ...]
    merge_seconds: float = 0.0
    split_seconds: float = 0.0


@dataclass(frozen=True)
class Stacking:
    """How requests' rows become one pass and come back out: arrays concatenate; named inputs (signature.py) pad,
    and only requests with equal keys share a pass."""

    merge: Callable[[list], object]
    split: Callable[[object, int, object], object]  # (the pass's output, the request's first row, its rows)
    key: Callable[[object], object]
    width: Callable[[object], int] | None = None  # a request's padded length (its tokens); None: rows alone count


ARRAYS = Stacking(
    merge=np.concatenate, split=lambda out, start, rows: out[start : start + len(rows)], key=lambda rows: None
)


class Batcher:
    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch: int,
        max_batch_delay_ms: float,
        max_queue: int,
        on_pass: Callable[[Pass], None] | None = None,
        stacking: Stacking | None = None,
        max_batch_tokens: int = 0,
    ):
        """The server's settings under their Config names (config.py); STACKING None: arrays concatenate."""
        self.run, self.max_batch, self.max_queue = run, max_batch, max_queue
        self.max_batch_tokens = max_batch_tokens if stacking is not None and stacking.width else 0
        self.max_batch_delay_ms = max_batch_delay_ms
        self.on_pass = on_pass or (lambda p: None)
        self.stacking = stacking or ARRAYS
        self.jobs: deque[Job] = deque()
        self.decoding = 0  # requests accepted and still being read or decoded: company worth a short wait
        self._wake = asyncio.Event()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="forward-pass")
        self._task: asyncio.Task | None = None
        self.inline = False  # a fast model's passes run on the event loop (served.warm_up decides; see _serve)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._serve(), name="batcher")

    @property
    def started(self) -> bool:
        return self._task is not None

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        self._thread.shutdown(wait=False, cancel_futures=True)

    @property
    def queued(self) -> int:
        return len(self.jobs)

    def enqueue(self, rows: np.ndarray, trace=None, *, prompt: bool = False, timed=None) -> asyncio.Future:
        """A future of this request's rows of the output, set once the pass that holds them has run. `prompt`: the
        request came in the loop turn its bytes did, and so would its company (REST, decoded on the loop); TIMED(s):
        told how many seconds that pass ran, before the future is set."""
        if len(self.jobs) >= self.max_queue:
            raise Overloaded(f"{len(self.jobs)} requests are queued in this worker (its limit): retry shortly")
        future = asyncio.get_running_loop().create_future()
        self.jobs.append(Job(rows, future, time.perf_counter(), trace, prompt, timed))
        self._wake.set()
        return future

    def _rows_queued(self) -> int:
        return sum(len(j.rows) for j in self.jobs)

    async def _gather(self) -> None:
        """Wait up to max_batch_delay_ms for requests already being read or decoded, while the batch is not full."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_batch_delay_ms / 1000
        while self.decoding and self._rows_queued() < self.max_batch and (left := deadline - loop.time()) > 0:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except TimeoutError:
                return

    def _take(self) -> list[Job]:
        taken, rows = [], 0
        if self.stacking is not ARRAYS:
            return self._take_matching()
        while self.jobs and (not taken or rows + len(self.jobs[0].rows) <= self.max_batch):
            job = self.jobs.popleft()
            if job.future.cancelled():  # its client went away while it waited
                continue
            taken.append(job)
            rows += len(job.rows)
        return taken

    def _take_matching(self) -> list[Job]:
        """The oldest request and those that may share its pass; the others keep their places. With a token budget,
        the candidates closest to the oldest's padded length go first, and a pass's longest row times its rows stays
        within max_batch_tokens: one long request does not pad many short ones to its length (TEI's
        --max-batch-tokens; measured in bench/NOTES.md, issue 34)."""
        jobs = [j for j in self.jobs if not j.future.cancelled()]
        if not jobs:
            self.jobs = deque()
            return []
        key, width, budget = self.stacking.key, self.stacking.width, self.max_batch_tokens
        first, others = jobs[0], jobs[1:]
        if budget:
            w0 = width(first.rows)
            others = sorted(others, key=lambda j: abs(width(j.rows) - w0))
        k, taken, rows, longest = key(first.rows), [], 0, 0
        for job in (first, *others):
            n, w = len(job.rows), width(job.rows) if budget else 0
            if taken and (
                key(job.rows) != k or rows + n > self.max_batch or (budget and max(longest, w) * (rows + n) > budget)
            ):
                continue
            taken.append(job)
            rows, longest = rows + n, max(longest, w)
        chosen = {id(j) for j in taken}
        self.jobs = deque(j for j in jobs if id(j) not in chosen)
        return taken

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.jobs:
                self._wake.clear()
                await self._wake.wait()
            await asyncio.sleep(0)  # let requests that have already arrived join this pass
            if self.max_batch_delay_ms > 0 and self.decoding:
                await self._gather()
            jobs = self._take()
            if not jobs:
                continue
            merging = time.perf_counter()
            x = (
                jobs[0].rows
                if len(jobs) == 1 and self.stacking is ARRAYS
                else self.stacking.merge([j.rows for j in jobs])
            )
            traced = any(j.trace is not None for j in jobs)
            wall = time.time_ns() if traced else 0
            start = time.perf_counter()
            try:
                # a lone request's pass stays on the thread unless it is prompt, so the loop is free to take in its
                # company meanwhile: gRPC's requests reach the queue only after several turns of the loop (found by a
                # clean-clone run), while REST's decoded on the loop are queued in the turn their bytes arrive
                inline = self.inline and (len(jobs) > 1 or jobs[0].prompt)
                out = self.run(x) if inline else await loop.run_in_executor(self._thread, self.run, x)
            except Exception as e:  # the model failed on valid input: every request of the pass gets the error
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            end = time.perf_counter()
            size = sum(len(j.rows) for j in jobs)
            if traced:
                for j in jobs:
                    if j.trace is not None:
                        j.trace.forward(wall, wall + int((end - start) * 1e9), size)
            at = 0
            for j in jobs:
                n = len(j.rows)
                if not j.future.done():
                    if j.timed is not None:
                        j.timed(end - start)
                    j.future.set_result(self.stacking.split(out, at, j.rows))
                at += n
            waits = tuple(merging - j.queued for j in jobs)
            self.on_pass(Pass(size, end - start, waits, start - merging, time.perf_counter() - end))
