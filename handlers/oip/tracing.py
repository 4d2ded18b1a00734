"""OpenTelemetry traces of every inference request: a server span continuing the client's W3C `traceparent`, with a
child per stage (decode, queue, forward, with the batch's size, and encode), over REST and gRPC alike.

On only where the standard variables ask for an OTLP exporter (OTEL_EXPORTER_OTLP_ENDPOINT, or ..._TRACES_ENDPOINT;
the other OTEL_* variables configure it as they do everywhere); then opentelemetry-sdk and the OTLP/HTTP exporter must
be installed (`pip install 'torchship[tracing]'`). Off, nothing of OpenTelemetry is imported and a request pays one
test of a module constant (measured in bench/NOTES.md). Stages are timed as they happen and the spans are made when
the request ends, so the hot path only reads the clock.
"""

from __future__ import annotations

import os
import time

ENABLED = bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
SERVICE = "torchship"
_tracer = None


def configure(processor=None) -> None:
    """The tracer, exporting over OTLP/HTTP (or into PROCESSOR: a test's in-memory exporter). Turns tracing on."""
    global _tracer, ENABLED
    # lazily, here and below: OpenTelemetry is optional (torchship[tracing]), imported only when tracing is on
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", SERVICE)}))
    if processor is None:
        # lazily: optional, see configure
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        processor = BatchSpanProcessor(OTLPSpanExporter())
    provider.add_span_processor(processor)
    _tracer = provider.get_tracer("torchship.handlers")
    ENABLED = True


def shutdown() -> None:
    """Send what is still buffered (a worker stopping)."""
    if _tracer is not None:
        from opentelemetry import trace  # lazily: optional, see configure

        provider = getattr(_tracer, "_tracer_provider", None) or trace.get_tracer_provider()
        getattr(provider, "shutdown", lambda: None)()


def start(traceparent, protocol: str) -> Trace | None:
    """A request's trace, or None when tracing is off (the callers test for None and do nothing more)."""
    if not ENABLED:
        return None
    if _tracer is None:
        configure()
    return Trace(traceparent, protocol)


class Trace:
    """One request's stages, timed with the wall clock in nanoseconds, made into spans by finish()."""

    __slots__ = ("traceparent", "protocol", "t0", "decoded", "started", "ran", "batch", "request_id")

    def __init__(self, traceparent, protocol: str):
        if isinstance(traceparent, bytes):
            traceparent = traceparent.decode("latin-1")
        self.traceparent, self.protocol, self.t0 = traceparent, protocol, time.time_ns()
        self.decoded = self.started = self.ran = self.batch = 0
        self.request_id = ""

    def mark_decoded(self) -> None:
        self.decoded = time.time_ns()

    def forward(self, started_ns: int, ended_ns: int, rows: int) -> None:
        """What the batcher saw of this request's forward pass."""
        self.started, self.ran, self.batch = started_ns, ended_ns, rows

    def finish(self, model: str, version: str, status: int) -> None:
        # lazily: optional, see configure
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        parent = (
            TraceContextTextMapPropagator().extract({"traceparent": self.traceparent}) if self.traceparent else None
        )
        end = time.time_ns()
        root = _tracer.start_span(
            f"infer {model}",
            context=parent,
            kind=SpanKind.SERVER,
            start_time=self.t0,
            attributes={
                "torchship.model": model,
                "torchship.version": version,
                "torchship.protocol": self.protocol,
                "torchship.status": status,
                "torchship.request_id": self.request_id,
            },
        )
        if status >= 400:
            root.set_status(Status(StatusCode.ERROR, f"status {status}"))
        inside = trace.set_span_in_context(root)
        stages = [("decode", self.t0, self.decoded or end, {})]
        if self.ran:
            stages += [
                ("queue", self.decoded, self.started, {}),
                ("forward", self.started, self.ran, {"torchship.batch_size": self.batch}),
                ("encode", self.ran, end, {}),
            ]
        for name, begin, finish, attributes in stages:
            if begin and finish:
                _tracer.start_span(name, context=inside, start_time=begin, attributes=attributes).end(end_time=finish)
        root.end(end_time=end)
