"""Load test of a running server: closed-loop concurrency sweep or open-loop fixed rate, loopback only.

Sends real held-out digits and checks every answer's label, so a fast wrong server shows as such. The wire side
(what each server is sent, how answers and metrics are read) is serve/client.py; the report is serve/report.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from torchship.serve.client import Connection, Target, answer, server_delta, server_metrics
from torchship.serve.samples import held_out_digits, on_paper, png


@dataclass
class Level:
    mode: str  # "closed" (concurrency) or "open" (rate)
    concurrency: int
    rate: float | None
    requests: int
    errors: dict[str, int]
    seconds: float
    throughput: float
    latency_ms: dict[str, float]
    accuracy: float  # of the labelled answers; NaN when no request carried a label
    server: dict = field(default_factory=dict)
    answers: list[int] = field(default_factory=list)  # per digit of the set: 1 right, 0 wrong, -1 not sent
    client_stall_ms: float = 0.0  # the longest the client's own loop stood still: a stall the server did not cause


@dataclass(frozen=True)
class Payload:
    body: bytes
    label: str | None  # None: the answer cannot be judged (an image without a label folder)
    content_type: str = "image/png"


CONTENT_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".bmp": "image/bmp",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
}


def payloads(style: str = "mnist", n: int = 1000) -> list[Payload]:
    """PNG-encoded held-out digits: as MNIST stores them, or photographed-style dark ink on white paper."""
    images, labels = held_out_digits()
    make = (lambda a: png(a)) if style == "mnist" else (lambda a: png(on_paper(a)))
    return [Payload(make(images[i]), str(labels[i])) for i in range(min(n, len(labels)))]


def image_payloads(directory: Path | str, limit: int = 10_000) -> list[Payload]:
    """Your own images: DIR/<label>/*.png gives labelled requests (accuracy counts), DIR/*.png unlabelled ones."""
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory of images")
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in CONTENT_TYPES:
            label = path.parent.name if path.parent != root else None
            found.append(Payload(path.read_bytes(), label, CONTENT_TYPES[path.suffix.lower()]))
            if len(found) >= limit:
                break
    if not found:
        raise ValueError(f"no images ({', '.join(sorted(CONTENT_TYPES))}) under {root}")
    return found


def percentiles(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {k: float("nan") for k in ("p50", "p90", "p99", "p99.9", "max", "mean")}
    a = np.asarray(latencies) * 1000
    q = np.percentile(a, [50, 90, 99, 99.9])
    return {"p50": q[0], "p90": q[1], "p99": q[2], "p99.9": q[3], "max": a.max(), "mean": a.mean()}


def run_level(
    target: Target,
    bodies,
    concurrency: int,
    duration: float,
    max_requests: int,
    rate: float | None = None,
    samples: list[float] | None = None,
    timeline: list[tuple[float, float, int]] | None = None,
    fresh: bool = False,
) -> Level:
    """Closed loop: `concurrency` clients back to back. Open loop (rate): sends on a fixed schedule and times
    each request from its intended send time, so a stalled server cannot hide its queue (no coordinated omission).
    FRESH: each request on a connection of its own."""
    before = server_metrics(target.metrics_url)
    with collector_paused():
        level = run(_level(target, bodies, concurrency, duration, max_requests, rate, samples, timeline, fresh))
    level.server = server_delta(target, before, server_metrics(target.metrics_url))
    return level


@contextlib.contextmanager
def collector_paused():
    """No garbage collection while the clients run: a full one in a process holding torch takes ~185 ms here, which
    the level would count against the server (bench/NOTES.md lever 78; not yet caught doing so). The clients make no
    reference cycles; the collector runs once before and after."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


STALL_TICK_S = 0.02  # how often the client's loop notes that it is still running


async def _watch_stalls(longest: list[float]) -> None:
    """The longest gap between two ticks of the client's own loop, less the tick."""
    last = time.perf_counter()
    while True:
        await asyncio.sleep(STALL_TICK_S)
        now = time.perf_counter()
        longest[0] = max(longest[0], now - last - STALL_TICK_S)
        last = now


def run(coroutine):
    """On uvloop when it is installed: the client's own share of the machine is what every server loses."""
    try:
        import uvloop  # optional: asyncio's own loop works too, slower

        return uvloop.run(coroutine)
    except ImportError:  # pragma: no cover
        return asyncio.run(coroutine)


async def _level(target, bodies, concurrency, duration, max_requests, rate, samples, timeline, fresh) -> Level:
    latencies, statuses, tally = [], Counter(), {"correct": 0, "judged": 0}
    answers = [-1] * len(bodies)
    requests = [target.request(p.body, p.content_type) for p in bodies]
    counter = iter(range(max_requests))
    t0 = time.perf_counter() + 0.05
    deadline = t0 + duration

    async def client() -> None:
        conn = Connection(target, fresh=fresh)
        try:
            while (i := next(counter, None)) is not None:
                intended = t0 + i / rate if rate else None
                if intended is not None and (delay := intended - time.perf_counter()) > 0:
                    await asyncio.sleep(delay)
                start = time.perf_counter()
                if start > deadline:
                    return
                p = bodies[i % len(bodies)]
                status, reply = await conn.send(requests[i % len(bodies)])
                end = time.perf_counter()
                ok = status == 200 and p.label is not None and answer(reply) == p.label
                if timeline is not None:
                    timeline.append((start, end, status))
                latencies.append(end - (intended if intended is not None else start))
                statuses[status] += 1
                tally["correct"] += ok
                tally["judged"] += status == 200 and p.label is not None
                answers[i % len(bodies)] = int(ok) if p.label is not None else -1
        finally:
            await conn.close()

    stall = [0.0]
    watcher = asyncio.ensure_future(_watch_stalls(stall))
    await asyncio.gather(*(client() for _ in range(concurrency)))
    seconds = max(time.perf_counter() - t0, 1e-9)
    watcher.cancel()
    if samples is not None:  # raw latencies (s), for callers that pool several runs
        samples.extend(latencies)
    n = sum(statuses.values())
    errors = {str(k): v for k, v in sorted(statuses.items()) if k != 200}
    accuracy = tally["correct"] / tally["judged"] if tally["judged"] else float("nan")
    return Level(
        "open" if rate else "closed",
        concurrency,
        rate,
        n,
        errors,
        seconds,
        n / seconds,
        percentiles(latencies),
        accuracy,
        {},
        answers,
        round(stall[0] * 1000, 1),
    )


def sweep(
    target: Target,
    concurrency=(1, 4, 16),
    duration: float = 10,
    max_requests: int = 20000,
    rate: float | None = None,
    style: str = "mnist",
    warmup: int = 50,
    bodies: list[Payload] | None = None,
) -> list[Level]:
    bodies = bodies or payloads(style)
    if warmup:  # warm the workers and the JVM's JIT: first calls pay for lazy init and interpretation
        run_level(target, bodies, min(4, max(concurrency)), 30, warmup)
    if rate:
        return [run_level(target, bodies, max(concurrency), duration, max_requests, rate)]
    return [run_level(target, bodies, c, duration, max_requests) for c in concurrency]


@dataclass
class Disruption:
    """What killing one worker under load cost: which requests failed, and how long until answers came back."""

    killed_pid: int
    requests: int
    failed: dict[str, int]  # status -> count, over the whole run
    sent_after_kill: int
    failed_sent_after_kill: int  # requests that failed although sent after the kill
    failed_after_seen: int  # failed although sent after the clients saw the first failure
    in_flight_at_kill: int  # requests sent before and answered after the kill
    failed_in_flight: int  # of those, the ones that failed: what the dead worker held
    recovery_s: float  # from the kill to the first success of a request sent after it
    longest_gap_s: float  # the longest time around the kill in which no request succeeded
    p99_ms: float


def kill_worker_under_load(
    target: Target,
    worker_pid: int,
    bodies: list[Payload],
    concurrency: int = 64,
    max_requests: int = 4000,
    duration: float = 60,
    kill_at: float = 0.3,
    fresh: bool = False,
) -> tuple[Level, Disruption]:
    """SIGKILL one worker once `kill_at` of the requests are answered, and measure the outage from the clients (FRESH:
    each request on a new connection, as run_level)."""
    timeline: list[tuple[float, float, int]] = []
    result: list[Level] = []
    runner = threading.Thread(
        target=lambda: result.append(
            run_level(target, bodies, concurrency, duration, max_requests, timeline=timeline, fresh=fresh)
        ),
        daemon=True,
    )
    runner.start()
    while len(timeline) < kill_at * max_requests and runner.is_alive():
        time.sleep(0.005)
    t_kill = time.perf_counter()
    os.kill(worker_pid, signal.SIGKILL)
    runner.join(duration + 60)
    level = result[0]
    events = sorted(timeline, key=lambda e: e[1])
    after = [end for start, end, status in events if status == 200 and start >= t_kill]
    ok_ends = [t_kill] + [end for _, end, status in events if status == 200 and end >= t_kill] + [events[-1][1]]
    failed = Counter(str(status) for _, _, status in events if status != 200)
    seen = min((end for _, end, status in events if status != 200), default=float("inf"))
    return level, Disruption(
        killed_pid=worker_pid,
        requests=len(events),
        failed=dict(failed),
        sent_after_kill=sum(1 for start, _, _ in events if start >= t_kill),
        failed_sent_after_kill=sum(1 for start, _, status in events if status != 200 and start >= t_kill),
        failed_after_seen=sum(1 for start, _, status in events if status != 200 and start >= seen),
        in_flight_at_kill=sum(1 for start, end, _ in events if start < t_kill <= end),
        failed_in_flight=sum(1 for start, end, status in events if status != 200 and start < t_kill <= end),
        recovery_s=(min(after) - t_kill) if after else float("inf"),
        longest_gap_s=max(b - a for a, b in zip(ok_ends, ok_ends[1:])) if len(ok_ends) > 1 else 0.0,
        p99_ms=level.latency_ms["p99"],
    )
