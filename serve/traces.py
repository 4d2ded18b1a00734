"""A small OTLP/HTTP trace receiver on 127.0.0.1, to see the OIP server's traces without a collector:
`torchship serve traces` prints each span as it arrives (start the server with OTEL_EXPORTER_OTLP_ENDPOINT set to
the address it prints). The tests read the spans it holds; the bench uses it as a traced server's collector."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class OtlpSink:
    def __init__(self, port: int = 0, keep: bool = True, on_span=None):
        self.spans: list = []  # opentelemetry.proto.trace.v1.trace_pb2.Span, in arrival order
        sink, watching, on_span = self, on_span is not None, on_span or (lambda span: None)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/v1/traces" and (keep or watching):
                    # lazily: OpenTelemetry is optional (torchship[tracing]), needed once traces arrive
                    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

                    request = ExportTraceServiceRequest.FromString(body)
                    for resource in request.resource_spans:
                        for scope in resource.scope_spans:
                            if keep:  # a sink that prints them (`serve traces`) need not hold them all
                                sink.spans.extend(scope.spans)
                            for span in scope.spans:
                                on_span(span)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def trace(self, trace_id: str) -> list:
        """The spans of one trace (trace_id as 32 hex digits)."""
        return [s for s in self.spans if s.trace_id.hex() == trace_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def line(span) -> str:
    """One span as a line: its trace, its name, how long it took, its attributes, and its events (a request's
    stages, by default) at their times since the span began."""
    ms = (span.end_time_unix_nano - span.start_time_unix_nano) / 1e6
    events = "".join(
        f"  {e.name} +{(e.time_unix_nano - span.start_time_unix_nano) / 1e6:.3f} ms{values(e.attributes) or ''}"
        for e in span.events
    )
    return f"{span.trace_id.hex()[:8]} {span.name:<20} {ms:8.3f} ms  {values(span.attributes)}{events}"


def values(attributes) -> dict:
    return {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in attributes if a.value.WhichOneof("value")}
