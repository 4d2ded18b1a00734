"""Prometheus metrics of the Open Inference Protocol server: one set of names for REST and gRPC alike, labelled by
model and version, summed over the worker processes (prometheus_client's multiprocess mode: PROMETHEUS_MULTIPROC_DIR,
set by the supervisor before any worker starts, holds each worker's values in files that /metrics adds up)."""

from __future__ import annotations

import functools
import os
import time

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Summary,
    generate_latest,
    multiprocess,
)

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The names clients and dashboards read; `torchship loadtest` computes queue and inference time per request from them.
REQUESTS = "torchship_requests_total"
REQUEST_SECONDS = "torchship_request_seconds"
REQUEST_BYTES = "torchship_request_bytes"  # the size of each inference request as it arrived (body, or gRPC message)
QUEUE_SECONDS = "torchship_queue_seconds"
INFERENCE_SECONDS = "torchship_inference_seconds"
BATCH_SIZE = "torchship_batch_size"
IN_FLIGHT = "torchship_requests_in_flight"
CONNECTIONS = "torchship_http_connections"
HANDED = "torchship_grpc_handed_calls_total"  # gRPC calls a worker handed to another to run (handoff.py)
# Triton's statistics extension, counted here so that GET /v2/models/M/stats sums every worker as /metrics does:
# per request, each of Triton's inference_stats but the queue (QUEUE_SECONDS), and per batch size, its passes
STATISTICS = "torchship_statistics_seconds"
BATCH_STATISTICS = "torchship_batch_statistics_seconds"
LAST_INFERENCE = "torchship_last_inference_timestamp_ms"
SHADOW = "torchship_shadow_requests_total"  # requests mirrored to a candidate version and compared
SHADOW_AGREED = "torchship_shadow_agreements_total"  # of those, the ones whose top-1 (or rounded value) agreed
SHADOW_MAX_DIFF = "torchship_shadow_max_abs_difference"  # the largest element-wise difference seen
LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BYTES_BUCKETS = tuple(1 << k for k in range(8, 25, 2))  # 256 B (one JSON digit) to 16 MiB, beyond the body limit
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MODEL = ("model", "version")


@functools.cache
def families() -> dict:
    """The metric families, registered once per process whatever the number of models it serves."""
    return {
        "requests": Counter(
            REQUESTS.removesuffix("_total"),
            "Inference requests answered, by model, version, protocol "
            "(rest, grpc) and status (HTTP code; 499: the client went away first)",
            [*MODEL, "protocol", "status"],
        ),
        "seconds": Histogram(
            REQUEST_SECONDS, "From a request's arrival to its answer", [*MODEL, "protocol"], buckets=LATENCY_BUCKETS
        ),
        "bytes": Histogram(
            REQUEST_BYTES,
            "Inference requests' sizes in bytes (a REST body, or a gRPC message), by model, version and protocol",
            [*MODEL, "protocol"],
            buckets=BYTES_BUCKETS,
        ),
        "queue": Histogram(
            QUEUE_SECONDS, "From joining the batch queue to its forward pass starting", MODEL, buckets=LATENCY_BUCKETS
        ),
        "inference": Histogram(INFERENCE_SECONDS, "One forward pass of a whole batch", MODEL, buckets=LATENCY_BUCKETS),
        "batch": Histogram(BATCH_SIZE, "Rows (images) in each forward pass", MODEL, buckets=BATCH_BUCKETS),
        "in_flight": Gauge(IN_FLIGHT, "Requests being read, queued or run", MODEL, multiprocess_mode="livesum"),
        "connections": Gauge(
            CONNECTIONS,
            "REST connections: open, and paused (not read while the client leaves its answers unread)",
            ["state"],
            multiprocess_mode="livesum",
        ),
        "handed": Counter(
            HANDED.removesuffix("_total"),
            "gRPC inference calls the worker holding their connection handed to another worker to run",
        ),
        "statistics": Summary(
            STATISTICS,
            "Triton's inference statistics per request: success and fail (the whole request), compute_input "
            "(decoding), compute_infer (its forward pass), compute_output (encoding)",
            [*MODEL, "statistic"],
        ),
        "batch_statistics": Summary(
            BATCH_STATISTICS,
            "Triton's batch statistics per forward pass, by its rows: compute_input (stacking the requests' rows), "
            "compute_infer (the pass), compute_output (cutting each request's rows back out)",
            [*MODEL, "batch_size", "statistic"],
        ),
        "last": Gauge(
            LAST_INFERENCE,
            "When the last inference request was answered, in ms since the epoch (to a tenth of a second)",
            MODEL,
            multiprocess_mode="max",
        ),
        "shadow": Counter(
            SHADOW.removesuffix("_total"),
            "Requests mirrored to a candidate version, by model, the version that answered and the candidate",
            ["model", "default", "candidate"],
        ),
        "agreed": Counter(
            SHADOW_AGREED.removesuffix("_total"),
            "Mirrored requests whose every row the candidate "
            "answered alike (the same top-1 label; values within the proof's tolerance)",
            ["model", "default", "candidate"],
        ),
        "max_diff": Gauge(
            SHADOW_MAX_DIFF,
            "The largest element-wise difference between a candidate's and the default's output",
            ["model", "default", "candidate"],
            multiprocess_mode="max",
        ),
    }


class Metrics:
    """One served model version's series."""

    def __init__(self, model: str, version: str = "1"):
        f = families()
        self.model, self.version = model, version
        self.in_flight = f["in_flight"].labels(model, version)
        self.active = 0  # this worker's own requests in flight (the gauge adds up every worker's)
        self.queue, self.inference, self.batch = (f[k].labels(model, version) for k in ("queue", "inference", "batch"))
        stat = f["statistics"]
        self.success, self.fail, self.compute_input, self.compute_infer, self.compute_output = (
            stat.labels(model, version, s)
            for s in ("success", "fail", "compute_input", "compute_infer", "compute_output")
        )
        self.last = f["last"].labels(model, version)
        self.last_set = 0.0
        self._children: dict = {}
        self._batches: dict = {}

    def started(self) -> None:
        self.active += 1
        self.in_flight.inc()

    def answered(self, protocol: str, status: int, seconds: float, nbytes: int, stages: tuple) -> None:
        """One request ended (pipeline.Flight.finish): its status, how long it took, how large it was, and for an
        answered one its (decoding, pass, encoding) seconds: Triton's three compute statistics, counted together per
        request (perf_analyzer refuses counts that differ)."""
        self.active -= 1
        self.in_flight.dec()
        if status == 200:
            self.success.observe(seconds)
            for stat, value in zip((self.compute_input, self.compute_infer, self.compute_output), stages):
                stat.observe(value)
        else:
            self.fail.observe(seconds)
        now = time.time()
        if now - self.last_set >= 0.1:  # the gauge to a tenth of a second: one write in many, not one a request
            self.last_set = now
            self.last.set(int(now * 1000))
        key = (protocol, status)
        if key not in self._children:  # label lookups cost more than the observations: keep the children
            f = families()
            self._children[key] = (
                f["requests"].labels(self.model, self.version, protocol, str(status)),
                f["seconds"].labels(self.model, self.version, protocol),
                f["bytes"].labels(self.model, self.version, protocol),
            )
        count, latency, size = self._children[key]
        count.inc()
        latency.observe(seconds)
        size.observe(nbytes)

    def ran(self, batch) -> None:
        """One forward pass (batching.Pass)."""
        self.batch.observe(batch.rows)
        self.inference.observe(batch.seconds)
        for wait in batch.waits:
            self.queue.observe(wait)
        if batch.rows not in self._batches:
            f = families()["batch_statistics"]
            self._batches[batch.rows] = [
                f.labels(self.model, self.version, str(batch.rows), s)
                for s in ("compute_input", "compute_infer", "compute_output")
            ]
        compute_input, compute_infer, compute_output = self._batches[batch.rows]
        compute_input.observe(batch.merge_seconds)
        compute_infer.observe(batch.seconds)
        compute_output.observe(batch.split_seconds)


def connections(open_: int, paused: int) -> None:
    """http11.Tally's watch: this worker's connections changed."""
    gauge = families()["connections"]
    gauge.labels("open").set(open_)
    gauge.labels("paused").set(paused)


def handed() -> None:
    families()["handed"].inc()


def shadowed(model: str, default: str, candidate: str, agreed: bool, max_diff: float) -> None:
    """One mirrored request compared: the shadow's evidence, per model pair."""
    f = families()
    f["shadow"].labels(model, default, candidate).inc()
    if agreed:
        f["agreed"].labels(model, default, candidate).inc()
    key = (model, default, candidate)
    if max_diff > _largest.get(key, -1.0):  # this worker's largest; /metrics shows the largest of all workers'
        _largest[key] = max_diff
        f["max_diff"].labels(*key).set(max_diff)


_largest: dict[tuple[str, str, str], float] = {}


def registry():
    """Every worker's metrics, added up (the supervisor's multiprocess files), or this process's own."""
    if not os.environ.get(MULTIPROCESS_ENV):
        return REGISTRY
    summed = CollectorRegistry()
    multiprocess.MultiProcessCollector(summed)
    return summed


def exposition() -> bytes:
    """What GET /metrics answers."""
    return generate_latest(registry())


def statistics(versions: list[tuple[str, str]]) -> list[dict]:
    """Triton's model_stats for each (model, version), summed over the workers: inference_count counts rows,
    execution_count forward passes, and every duration is {"count", "ns"}."""
    values: dict = {}  # (sample name, sorted labels) -> value, for the versions asked about
    for family in registry().collect():
        for sample in family.samples:
            if (sample.labels.get("model"), sample.labels.get("version")) in versions:
                values[(sample.name, *sorted(sample.labels.items()))] = sample.value
    return [model_statistics(values, model, version) for model, version in versions]


def model_statistics(values: dict, model: str, version: str) -> dict:
    def value(name: str, **labels) -> float:
        return values.get((name, *sorted({"model": model, "version": version, **labels}.items())), 0)

    def duration(name: str, **labels) -> dict:
        return {"count": int(value(f"{name}_count", **labels)), "ns": int(value(f"{name}_sum", **labels) * 1e9)}

    stages = ("compute_input", "compute_infer", "compute_output")
    stats = {s: duration(STATISTICS, statistic=s) for s in ("success", "fail")}
    stats["queue"] = duration(QUEUE_SECONDS)
    stats.update({s: duration(STATISTICS, statistic=s) for s in stages})
    for s in stages:  # observed with success, one each per answered request; read while another worker writes, the
        stats[s]["count"] = stats["success"]["count"]  # files may be a count apart, which perf_analyzer refuses
    stats["cache_hit"] = stats["cache_miss"] = {"count": 0, "ns": 0}  # there is no response cache
    sizes = sorted(
        {
            int(dict(k[1:])["batch_size"])
            for k in values
            if k[0] == f"{BATCH_STATISTICS}_count"
            and dict(k[1:])["model"] == model
            and dict(k[1:])["version"] == version
        }
    )
    return {
        "name": model,
        "version": version,
        "last_inference": int(value(LAST_INFERENCE)),
        "inference_count": int(value(f"{BATCH_SIZE}_sum")),  # rows of every pass
        "execution_count": int(value(f"{BATCH_SIZE}_count")),  # passes
        "inference_stats": stats,
        "batch_stats": [
            {"batch_size": n, **{s: duration(BATCH_STATISTICS, batch_size=str(n), statistic=s) for s in stages}}
            for n in sizes
        ],
    }


def forget(pid: int, directory: str) -> None:
    """A dead worker's live gauges (requests in flight) stop counting; its counters stay in the sums."""
    multiprocess.mark_process_dead(pid, directory)
