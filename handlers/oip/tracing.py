"""OpenTelemetry traces of every inference request: a server span continuing the client's W3C `traceparent`, with a
child per stage (decode, queue, forward, with the batch's size, and encode), over REST and gRPC alike.

On only where the standard variables ask for an OTLP exporter (OTEL_EXPORTER_OTLP_ENDPOINT, or ..._TRACES_ENDPOINT;
the other OTEL_* variables configure it as they do everywhere); then opentelemetry-sdk and the OTLP/HTTP exporter must
be installed (`pip install 'torchship[tracing]'`). Off, nothing of OpenTelemetry is imported and a request pays one
test of a module constant (measured in bench/NOTES.md). Stages are timed as they happen and the spans are made when
the request ends, so the hot path only reads the clock.

Sampling is decided once, when the request arrives, by the sampler the standard variables name (OTEL_TRACES_SAMPLER,
OTEL_TRACES_SAMPLER_ARG; parentbased_always_on by default, as the SDK's): a request left out is not timed and makes
no span at all (bench/NOTES.md, lever 58). The root span then gets the trace id the decision was taken on, so a
ratio sampler asked again by the SDK decides the same.
"""

from __future__ import annotations

import os
import random
import time

ENABLED = bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
SERVICE = "torchship"
_tracer = _sampler = _ids = _propagator = None


def configure(processor=None) -> None:
    """The tracer, exporting over OTLP/HTTP (or into PROCESSOR: a test's in-memory exporter). Turns tracing on."""
    global _tracer, _sampler, _ids, _propagator, ENABLED
    # lazily, here and below: OpenTelemetry is optional (torchship[tracing]), imported only when tracing is on
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    class DecidedIds(RandomIdGenerator):
        """A root span's trace id: the one its request was sampled on."""

        decided = 0

        def generate_trace_id(self) -> int:
            return self.decided or super().generate_trace_id()

    _ids, _propagator = DecidedIds(), TraceContextTextMapPropagator()
    provider = TracerProvider(
        resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", SERVICE)}), id_generator=_ids
    )  # its sampler: the one OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG name
    _sampler = provider.sampler
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
    """A request's trace, or None when tracing is off or the sampler leaves it out (the callers test for None and do
    nothing more)."""
    if not ENABLED:
        return None
    if _tracer is None:
        configure()
    from opentelemetry.trace import get_current_span  # lazily: optional, see configure

    if isinstance(traceparent, bytes):
        traceparent = traceparent.decode("latin-1")
    parent = _propagator.extract({"traceparent": traceparent}) if traceparent else None
    span = get_current_span(parent).get_span_context() if parent is not None else None
    trace_id = span.trace_id if span is not None and span.is_valid else random.getrandbits(128) or 1
    if not _sampler.should_sample(parent, trace_id, "infer").decision.is_sampled():
        return None
    return Trace(parent, trace_id, protocol)


class Trace:
    """One request's stages, timed with the wall clock in nanoseconds, made into spans by finish()."""

    __slots__ = ("parent", "trace_id", "protocol", "t0", "decoded", "started", "ran", "batch", "request_id")

    def __init__(self, parent, trace_id: int, protocol: str):
        self.parent, self.trace_id, self.protocol, self.t0 = parent, trace_id, protocol, time.time_ns()
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

        end = time.time_ns()
        _ids.decided = self.trace_id  # a root span: the id it was sampled on (the loop's thread makes every span)
        root = _tracer.start_span(
            f"infer {model}",
            context=self.parent,
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
        _ids.decided = 0
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
