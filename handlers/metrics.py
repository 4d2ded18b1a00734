"""Prometheus metrics of the Open Inference Protocol server: one set of names for REST and gRPC alike, summed over
the worker processes (prometheus_client's multiprocess mode: PROMETHEUS_MULTIPROC_DIR, set by the supervisor before
any worker starts, holds each worker's values in files that /metrics adds up)."""

from __future__ import annotations

import os

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The names clients and dashboards read; `torchship loadtest` computes queue and inference time per request from them.
REQUESTS = "torchship_requests_total"
REQUEST_SECONDS = "torchship_request_seconds"
QUEUE_SECONDS = "torchship_queue_seconds"
INFERENCE_SECONDS = "torchship_inference_seconds"
BATCH_SIZE = "torchship_batch_size"
IN_FLIGHT = "torchship_requests_in_flight"
CONNECTIONS = "torchship_http_connections"
LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self, model: str):
        from prometheus_client import Counter, Gauge, Histogram

        def histogram(name, text, buckets, labels=("model",)):
            return Histogram(name, text, labels, buckets=buckets)

        self.model = model
        self._requests = Counter(REQUESTS.removesuffix("_total"), "Inference requests answered, by model, protocol "
                                 "(rest, grpc) and status (HTTP code)", ["model", "protocol", "status"])  # fmt: skip
        self._seconds = histogram(REQUEST_SECONDS, "From a request's arrival to its answer", LATENCY_BUCKETS,
                                  ("model", "protocol"))  # fmt: skip
        self._queue = histogram(QUEUE_SECONDS, "From joining the batch queue to its forward pass starting",
                                LATENCY_BUCKETS)  # fmt: skip
        self._inference = histogram(INFERENCE_SECONDS, "One forward pass of a whole batch", LATENCY_BUCKETS)
        self._batch = histogram(BATCH_SIZE, "Rows (images) in each forward pass", BATCH_BUCKETS)
        self._in_flight = Gauge(IN_FLIGHT, "Requests being read, queued or run", ["model"],
                                multiprocess_mode="livesum")  # fmt: skip
        self.in_flight = self._in_flight.labels(model)
        connections = Gauge(CONNECTIONS, "REST connections: open, and paused (not read while the client leaves its "
                            "answers unread)", ["state"], multiprocess_mode="livesum")  # fmt: skip
        self._open, self._paused = connections.labels("open"), connections.labels("paused")
        self.active = 0  # this worker's own requests in flight (the gauge adds up every worker's)
        self.queue, self.inference, self.batch = (m.labels(model) for m in (self._queue, self._inference, self._batch))
        self._children: dict = {}

    def started(self) -> None:
        self.active += 1
        self.in_flight.inc()

    def answered(self, protocol: str, status: int, seconds: float) -> None:
        self.active -= 1
        self.in_flight.dec()
        key = (protocol, status)
        if key not in self._children:  # label lookups cost more than the observations: keep the children
            self._children[key] = (self._requests.labels(self.model, protocol, str(status)),
                                   self._seconds.labels(self.model, protocol))  # fmt: skip
        count, latency = self._children[key]
        count.inc()
        latency.observe(seconds)

    def connections(self, open_: int, paused: int) -> None:
        """http11.Tally's watch: this worker's connections changed."""
        self._open.set(open_)
        self._paused.set(paused)

    def ran(self, batch) -> None:
        """One forward pass (batching.Pass)."""
        self.batch.observe(batch.rows)
        self.inference.observe(batch.seconds)
        for wait in batch.waits:
            self.queue.observe(wait)


def exposition() -> bytes:
    """Every worker's metrics, added up: what GET /metrics answers."""
    from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

    if not os.environ.get(MULTIPROCESS_ENV):
        return generate_latest(REGISTRY)
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry)


def forget(pid: int, directory: str) -> None:
    """A dead worker's live gauges (requests in flight) stop counting; its counters stay in the sums."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, directory)
