"""The server's own OTLP encoder (oip/otlp.py) against the SDK's: the same ExportTraceServiceRequest for the spans
the server makes (events, an error status, a remote parent with its trace state, none, both span kinds, every scalar
attribute type), and the SDK's own encoding, through the fallback, for what it does not write."""

from __future__ import annotations

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from torchship.handlers.oip import otlp

RESOURCE = Resource.create({"service.name": "torchship"})
SCOPE = InstrumentationScope("torchship.handlers")
PARENT = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(1), trace_state=TraceState([("k", "v")]))


def span(i: int, parent=None, failed=False, attributes=None, resource=RESOURCE) -> ReadableSpan:
    state = parent.trace_state if parent is not None else None
    return ReadableSpan(
        f"infer m{i}",
        SpanContext(2**127 + i, 2**63 + i, is_remote=False, trace_flags=TraceFlags(1), trace_state=state),
        parent,
        resource,
        attributes or {"torchship.model": "m", "torchship.status": 200 + i, "ok": True, "share": 0.5, "neg": -3},
        kind=SpanKind.SERVER if i % 2 else SpanKind.INTERNAL,
        status=Status(StatusCode.ERROR, "status 503") if failed else Status(),
        start_time=10**18 + i,
        end_time=10**18 + 5000 + i,
        instrumentation_scope=SCOPE,
        events=[Event("decoded", {}, 10**18 + 10), Event("forward", {"torchship.batch_size": 8}, 10**18 + 20)],
    )


def test_the_servers_spans_encode_as_the_sdk_encodes_them():
    other = Resource.create({"service.name": "other"})
    spans = [span(i, PARENT if i % 3 else None, i % 4 == 0, resource=other if i == 7 else RESOURCE) for i in range(20)]
    ours = otlp.encode(spans)
    assert ExportTraceServiceRequest.FromString(ours) == encode_spans(spans)
    assert len(ExportTraceServiceRequest.FromString(ours).resource_spans) == 2  # grouped by resource, as the SDK


def test_a_batch_it_cannot_write_whole_is_refused_whole_for_the_sdk():
    with pytest.raises(otlp.Unwritable):
        otlp.encode([span(1, attributes={"shape": [1, 3]})])
    with pytest.raises(otlp.Unwritable):
        otlp.encode([span(1, attributes={"nested": {"a": 1}})])
