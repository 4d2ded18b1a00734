"""The server's spans as OTLP's protobuf (an ExportTraceServiceRequest), written by hand, and the SDK's OTLP/HTTP
exporter sending them: its endpoint, headers, compression and retries come from the OTEL_* variables as before.

Exists for speed: the SDK's encoder (`encode_spans`) builds a protobuf object per field and took ~45 µs of a traced
request on the export thread, beside the requests it competes with for the GIL (bench/NOTES.md, levers 63 and 66).
Any span this cannot write (a list or mapping attribute, links) sends its whole batch through the SDK's encoder."""

from __future__ import annotations

import struct

DOUBLE = struct.Struct("<d")
FIXED64 = struct.Struct("<Q")
FIXED32 = struct.Struct("<L")
HAS_IS_REMOTE, IS_REMOTE = 0x100, 0x200  # SpanFlags: what OTLP's flags say of the parent


class Unwritable(Exception):
    """A value outside what this encoder writes: the batch goes through the SDK's encoder."""


def varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field (TAG: its key, the field's number shifted with wire type 2)."""
    n = len(payload)
    return tag + (bytes((n,)) if n < 0x80 else varint(n)) + payload


def text(tag: bytes, value: str) -> bytes:
    return field(tag, value.encode()) if value else b""


def value(v) -> bytes:
    """An AnyValue."""
    if isinstance(v, bool):
        return b"\x10\x01" if v else b"\x10\x00"
    if isinstance(v, str):
        return field(b"\x0a", v.encode())
    if isinstance(v, int):
        return b"\x18" + varint(v & 0xFFFFFFFFFFFFFFFF)
    if isinstance(v, float):
        return b"\x21" + DOUBLE.pack(v)
    if isinstance(v, bytes):
        return field(b"\x3a", v)
    raise Unwritable(type(v).__name__)


KEPT = 4096  # attributes remembered as written: a server's spans repeat their models, versions, protocols, statuses
_written: dict[tuple, bytes] = {}


def attributes(tag: bytes, attrs) -> bytes:
    """Repeated KeyValue under TAG."""
    if not attrs:
        return b""
    out = []
    for k, v in attrs.items():
        key = (tag, k, type(v), v)
        try:
            kv = _written.get(key)
        except TypeError:  # a list or mapping
            raise Unwritable(type(v).__name__) from None
        if kv is None:
            kv = field(tag, field(b"\x0a", k.encode()) + field(b"\x12", value(v)))
            if len(_written) >= KEPT:
                _written.clear()
            _written[key] = kv
        out.append(kv)
    return b"".join(out)


def span(s) -> bytes:
    if s.links:
        raise Unwritable("links")
    context, parent = s.context, s.parent
    out = [
        b"\x0a\x10" + context.trace_id.to_bytes(16, "big"),
        b"\x12\x08" + context.span_id.to_bytes(8, "big"),
    ]
    if context.trace_state:
        out.append(text(b"\x1a", ",".join(f"{k}={v}" for k, v in context.trace_state.items())))
    if parent is not None:
        out.append(b"\x22\x08" + parent.span_id.to_bytes(8, "big"))
    out += [
        text(b"\x2a", s.name),
        b"\x30" + varint(s.kind.value + 1),  # OTLP counts its kinds from UNSPECIFIED
        b"\x39" + FIXED64.pack(s.start_time),
        b"\x41" + FIXED64.pack(s.end_time),
        attributes(b"\x4a", s.attributes),
    ]
    if s.dropped_attributes:
        out.append(b"\x50" + varint(s.dropped_attributes))
    for e in s.events:
        body = b"\x09" + FIXED64.pack(e.timestamp) + text(b"\x12", e.name) + attributes(b"\x1a", e.attributes)
        out.append(field(b"\x5a", body + (b"\x20" + varint(e.dropped_attributes) if e.dropped_attributes else b"")))
    if s.dropped_events:
        out.append(b"\x60" + varint(s.dropped_events))
    status = s.status
    code = status.status_code.value
    out.append(field(b"\x7a", text(b"\x12", status.description or "") + (b"\x18" + varint(code) if code else b"")))
    flags = HAS_IS_REMOTE | (IS_REMOTE if parent is not None and parent.is_remote else 0)
    out.append(b"\x85\x01" + FIXED32.pack(flags))
    return b"".join(out)


def scope(sc) -> bytes:
    if sc is None:
        return b""
    return text(b"\x0a", sc.name) + text(b"\x12", sc.version or "") + attributes(b"\x1a", sc.attributes)


def encode(spans) -> bytes:
    """SPANS (SDK ReadableSpans) as one ExportTraceServiceRequest, grouped by resource, then scope, as the SDK does."""
    grouped: dict = {}
    for s in spans:
        sc = s.instrumentation_scope or None
        grouped.setdefault(s.resource, {}).setdefault(sc, []).append(span(s))
    out = []
    for resource, scopes in grouped.items():
        body = [field(b"\x0a", attributes(b"\x0a", resource.attributes))]
        for sc, written in scopes.items():
            inner = field(b"\x0a", scope(sc)) + b"".join(field(b"\x12", w) for w in written)
            body.append(field(b"\x12", inner + text(b"\x1a", sc.schema_url if sc is not None else "")))
        body.append(text(b"\x1a", resource.schema_url))
        out.append(field(b"\x0a", b"".join(body)))
    return b"".join(out)


def exporter():
    """The SDK's OTLP/HTTP span exporter, sending what `encode` writes."""
    # lazily: OpenTelemetry is optional (torchship[tracing]), imported only when tracing is on
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import SpanExportResult

    class Exporter(OTLPSpanExporter):
        def export(self, spans):
            client = getattr(self, "_client", None)  # the SDK's HTTP client (1.4x): else the SDK's whole export
            if client is None or getattr(self, "_shutdown", True):
                return super().export(spans)
            try:
                data = encode(spans)
            except Unwritable:
                return super().export(spans)
            result = client.export(data)
            return SpanExportResult.SUCCESS if result.success else SpanExportResult.FAILURE

    return Exporter()
