"""OpenTelemetry traces of every inference request: a server span continuing the client's W3C `traceparent`, its
stages told as that span's events (decoded; forward, with the batch's size; forwarded) or, with `--trace_stages
spans`, as a child span each (decode, queue, forward, encode), over REST and gRPC alike.

On only where the standard variables ask for an OTLP exporter (OTEL_EXPORTER_OTLP_ENDPOINT, or ..._TRACES_ENDPOINT;
the other OTEL_* variables configure it as they do everywhere); then opentelemetry-sdk and the OTLP/HTTP exporter must
be installed (`pip install 'torchship[tracing]'`). Off, nothing of OpenTelemetry is imported and a request pays one
test of a module constant (measured in bench/NOTES.md). Stages are timed as they happen and the spans are made when
the request ends, so the hot path only reads the clock.

Sampling is decided once, when the request arrives, by the sampler the standard variables name (OTEL_TRACES_SAMPLER,
OTEL_TRACES_SAMPLER_ARG; parentbased_always_on by default, as the SDK's): a request left out is not timed and makes
no span at all (bench/NOTES.md, lever 58); the spans of one it keeps carry the trace id the decision was taken on.
"""

from __future__ import annotations

import os
import random
import time

from . import otlp

ENABLED = bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
SERVICE = "torchship"
_provider = _processor = _sampler = _propagator = _made = _span_of = _event = None  # configure() sets them
STAGES = "events"  # config.TRACE_STAGES: the worker sets its Config's trace_stages here at start


def configure(processor=None) -> None:
    """The provider, exporting over OTLP/HTTP (or into PROCESSOR: a test's in-memory exporter). Turns tracing on."""
    global _provider, _processor, _sampler, _propagator, _made, _span_of, _event, ENABLED
    # lazily, here and below: OpenTelemetry is optional (torchship[tracing]), imported only when tracing is on
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, get_current_span
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _propagator, _span_of = TraceContextTextMapPropagator(), get_current_span
    _provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", SERVICE)}))
    _sampler = _provider.sampler  # the one OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG name
    if processor is None:
        # lazily: optional, see configure
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        processor = BatchSpanProcessor(otlp.exporter())
    _provider.add_span_processor(processor)
    _processor = processor
    scope, resource, sampled = InstrumentationScope("torchship.handlers"), _provider.resource, TraceFlags(1)
    error, unset = StatusCode.ERROR, Status()

    def made(name, trace_id, span_id, parent, start, end, attributes, kind=SpanKind.INTERNAL, failed="", events=()):
        """A finished span, built whole: the SDK's start_span/end would re-sample, lock and validate each of a
        request's five spans again (bench/NOTES.md, lever 58)."""
        state = parent.trace_state if parent is not None else None
        return ReadableSpan(
            name,
            SpanContext(trace_id, span_id, is_remote=False, trace_flags=sampled, trace_state=state),
            parent,
            resource,
            attributes,
            kind=kind,
            status=Status(error, failed) if failed else unset,
            start_time=start,
            end_time=end,
            instrumentation_scope=scope,
            events=events,
        )

    _made, _event = (made, SpanKind.SERVER), Event
    ENABLED = True


def shutdown() -> None:
    """Send what is still buffered (a worker stopping)."""
    if _provider is not None:
        _provider.shutdown()


def start(traceparent, protocol: str) -> Trace | None:
    """A request's trace, or None when tracing is off or the sampler leaves it out (the callers test for None and do
    nothing more)."""
    if not ENABLED:
        return None
    if _provider is None:
        configure()
    if isinstance(traceparent, bytes):
        traceparent = traceparent.decode("latin-1")
    context = _propagator.extract({"traceparent": traceparent}) if traceparent else None
    parent = _span_of(context).get_span_context() if context is not None else None
    parent = parent if parent is not None and parent.is_valid else None
    trace_id = parent.trace_id if parent is not None else random.getrandbits(128) or 1
    if not _sampler.should_sample(context, trace_id, "infer").decision.is_sampled():
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
        made, server = _made
        end, trace_id = time.time_ns(), self.trace_id
        root_id = random.getrandbits(64) or 1
        attributes = {
            "torchship.model": model,
            "torchship.version": version,
            "torchship.protocol": self.protocol,
            "torchship.status": status,
            "torchship.request_id": self.request_id,
        }
        failed = f"status {status}" if status >= 400 else ""
        if STAGES == "events":  # one span: half the cost of five to build and export (bench/NOTES.md, lever 63)
            events = [_event("decoded", {}, self.decoded or end)]
            if self.ran:
                events += [_event("forward", {"torchship.batch_size": self.batch}, self.started)]
                events += [_event("forwarded", {}, self.ran)]
            _processor.on_end(
                made(f"infer {model}", trace_id, root_id, self.parent, self.t0, end, attributes, server, failed, events)
            )
            return
        root = made(f"infer {model}", trace_id, root_id, self.parent, self.t0, end, attributes, server, failed)
        inside = root.context
        stages = [("decode", self.t0, self.decoded or end, {})]
        if self.ran:
            stages += [
                ("queue", self.decoded, self.started, {}),
                ("forward", self.started, self.ran, {"torchship.batch_size": self.batch}),
                ("encode", self.ran, end, {}),
            ]
        for name, begin, finish, extra in stages:
            if begin and finish:
                _processor.on_end(made(name, trace_id, random.getrandbits(64) or 1, inside, begin, finish, extra))
        _processor.on_end(root)
