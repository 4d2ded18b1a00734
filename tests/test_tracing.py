"""Traces: a client's W3C traceparent continues into a server span with one child per stage (decode, queue, forward
with its batch's size, encode), read from the SDK's in-memory exporter and, end to end over REST and gRPC, from an
OTLP/HTTP receiver the test runs."""

import asyncio
import os
import re
import secrets

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp

from torchship.handlers.oip import served, tracing
from torchship.handlers.oip.config import TRACE_STAGES, Config
from torchship.serve import oip
from torchship.serve.samples import held_out_digits, png
from torchship.serve.traces import OtlpSink

from helpers import wait_for

DIGIT = png(held_out_digits()[0][0])
STAGES = ["decode", "queue", "forward", "encode"]  # --trace_stages spans: a child span each
EVENTS = ["decoded", "forward", "forwarded"]  # the default: events of the request's one span


def access_log(state) -> str:
    return (state / "logs" / oip.LOG).read_text()


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


@pytest.mark.parametrize("stages", TRACE_STAGES)
def test_a_requests_stages_are_told_in_the_clients_trace(convnet_export, stages):
    """The batcher and the real model in this process; the spans as the SDK's in-memory exporter holds them: by
    default one server span whose events are the stages, with --trace_stages spans a child span each."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracing.configure(SimpleSpanProcessor(exporter))
    tracing.STAGES = stages
    try:
        config = Config((str(convnet_export.directory),), max_batch=8, max_batch_delay_ms=0, threads=1, max_queue=64)
        version = served.load(str(convnet_export.directory), config)
        header, trace_id, span_id = traceparent()
        x = np.stack([version.preprocessor.from_bytes(DIGIT)] * 3)

        async def one_request():
            version.batcher.start()
            trace = tracing.start(header, "rest")
            trace.mark_decoded()
            out = await version.batcher.enqueue(x, trace)
            trace.finish(version.name, version.version, 200)
            await version.batcher.stop()
            return out

        assert asyncio.run(one_request()).shape == (3, 10)
    finally:
        tracing.ENABLED = bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
        tracing.STAGES = Config.trace_stages
    spans = {s.name: s for s in exporter.get_finished_spans()}
    root = spans[f"infer {version.name}"]
    assert format(root.context.trace_id, "032x") == trace_id and format(root.parent.span_id, "016x") == span_id
    if stages == "events":
        assert list(spans) == [root.name] and [e.name for e in root.events] == EVENTS
        assert root.events[1].attributes["torchship.batch_size"] == 3
        times = [root.start_time, *(e.timestamp for e in root.events), root.end_time]
        assert times == sorted(times)  # one after the other, inside the request
        return
    assert all(spans[n].parent.span_id == root.context.span_id for n in STAGES)
    assert spans["forward"].attributes["torchship.batch_size"] == 3
    order = [spans[n] for n in STAGES]
    assert all(a.end_time <= b.start_time + 1 for a, b in zip(order, order[1:]))  # one after the other, in time
    assert root.start_time <= order[0].start_time and order[-1].end_time <= root.end_time


def sampled_ids(sampler: str, arg: str | None, traceparents: list[str | None], monkeypatch) -> tuple[list, list]:
    """Under SAMPLER (and ARG): the trace ids of the requests sampled when they arrived, and of the roots exported."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)
    if arg is not None:
        monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", arg)
    exporter = InMemorySpanExporter()
    tracing.configure(SimpleSpanProcessor(exporter))
    try:
        started = []
        for header in traceparents:
            if (trace := tracing.start(header, "rest")) is not None:
                trace.mark_decoded()
                trace.finish("m", "1", 200)
                started.append(trace.trace_id)
    finally:
        tracing.ENABLED = bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    roots = [s.context.trace_id for s in exporter.get_finished_spans() if s.name == "infer m"]
    return started, roots


def test_the_standard_sampler_variables_decide_when_a_request_arrives(monkeypatch):
    bound = 1 << 62  # a ratio of 0.25 samples the trace ids whose low 64 bits are below 2**62 (the SDK's rule)
    low = [(i << 64) | (bound - 1 - i) for i in range(1, 21)]
    high = [(i << 64) | (bound + i) for i in range(1, 21)]
    header = lambda trace_id, flags: f"00-{trace_id:032x}-{secrets.token_hex(8)}-{flags}"  # noqa: E731
    # traceidratio: by the trace id alone, whatever the parent says
    started, roots = sampled_ids("traceidratio", "0.25", [header(t, "01") for t in low + high], monkeypatch)
    assert started == roots == low
    # parent-based: the parent's sampled flag decides; without a parent, the root sampler (here: never)
    mixed = [header(low[0], "01"), header(low[1], "00"), None, None]
    assert sampled_ids("parentbased_always_off", None, mixed, monkeypatch) == ([low[0]], [low[0]])
    assert sampled_ids("parentbased_traceidratio", "0", mixed, monkeypatch) == ([low[0]], [low[0]])
    assert sampled_ids("always_off", None, mixed, monkeypatch) == ([], [])
    # the default (parentbased_always_on): every request but those whose parent was not sampled
    monkeypatch.delenv("OTEL_TRACES_SAMPLER_ARG")
    started, roots = sampled_ids("parentbased_always_on", None, mixed, monkeypatch)
    assert len(started) == 3 and started[0] == low[0] and started == roots
    # a root's own trace id: the span carries the id the request was sampled on, so the SDK, asking the ratio sampler
    # again, keeps every trace the request's decision kept (with fresh ids it would drop about half of them)
    started, roots = sampled_ids("traceidratio", "0.5", [None] * 400, monkeypatch)
    assert 0 < len(started) < 400 and roots == started


def test_rest_and_grpc_requests_export_their_traces_over_otlp(convnet_export, tmp_path, monkeypatch):
    """Under parentbased_always_off: the client's sampled traces continue; a request without one, or whose parent
    was not sampled, makes no span (sent first: the exporter sends spans in the order they end)."""
    sink = OtlpSink()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", sink.endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # export every 0.1 s instead of 5
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_off")
    cfg = oip.start(
        oip.OIPConfig.on_free_ports(
            str(convnet_export.directory),
            "mnist",
            str(tmp_path),
            workers=1,
            max_batch=8,
            max_batch_delay_ms=1,
            threads=1,
            access_log=True,
        ),
        timeout=120,
    )
    try:
        sent = {}
        for kind, module, port in (("rest", thttp, cfg.http_port), ("grpc", tgrpc, cfg.grpc_port)):
            header, trace_id, span_id = traceparent()
            inp = module.InferInput("images", [1], "BYTES")
            inp.set_data_from_numpy(np.array([DIGIT], dtype=object))
            client = module.InferenceServerClient(f"127.0.0.1:{port}")
            client.infer("mnist", [inp])
            client.infer("mnist", [inp], headers={"traceparent": header[:-2] + "00"})
            client.infer("mnist", [inp], request_id=f"req-{kind}", headers={"traceparent": header})
            sent[kind] = (trace_id, span_id)
        for kind, (trace_id, span_id) in sent.items():
            (root,) = wait_for(lambda t=trace_id: sink.trace(t), 60, f"the {kind} trace")
            assert root.name == "infer mnist"
            assert root.parent_span_id.hex() == span_id and root.kind == root.SPAN_KIND_SERVER
            attributes = {a.key: a.value for a in root.attributes}
            assert attributes["torchship.protocol"].string_value == kind
            assert attributes["torchship.request_id"].string_value == f"req-{kind}"
            assert [e.name for e in root.events] == EVENTS
            forward = {a.key: a.value for a in root.events[1].attributes}
            assert forward["torchship.batch_size"].int_value == 1
            line = rf" {kind} \S+ mnist/1 200 \S+ms id=req-{kind}$"  # the same request id in the access log
            wait_for(lambda p=line: re.search(p, access_log(tmp_path), re.M), 30, f"the {kind} request's log line")
        assert len(sink.spans) == 2  # the sampled requests' spans alone
    finally:
        oip.stop(tmp_path)
        sink.close()


def test_serve_traces_prints_the_spans_of_a_request(convnet_export, tmp_path, monkeypatch):
    """`torchship serve traces` itself (it printed nothing: the sink it ran kept no spans, and parsed none either), of
    a server started with --trace_stages spans (the flag reaches the workers)."""
    import subprocess
    import threading

    from torchship.serve.process import free_ports

    from helpers import TORCHSHIP

    (port,) = free_ports(1)
    printer = subprocess.Popen([*TORCHSHIP, "serve", "traces", "--port", str(port)], stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(printer.stdout.readline, "")), daemon=True).start()
    try:
        wait_for(lambda: any("receiving traces" in x for x in lines), 60, "the receiver's first line")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        cfg = oip.OIPConfig.on_free_ports(
            str(convnet_export.directory),
            "mnist",
            str(tmp_path),
            workers=1,
            max_batch=8,
            max_batch_delay_ms=1,
            threads=1,
            trace_stages="spans",
        )
        cfg = oip.start(cfg, timeout=120)
        try:
            header, trace_id, _ = traceparent()
            inp = thttp.InferInput("images", [1], "BYTES")
            inp.set_data_from_numpy(np.array([DIGIT], dtype=object))
            thttp.InferenceServerClient(f"127.0.0.1:{cfg.http_port}").infer(
                "mnist", [inp], headers={"traceparent": header}
            )
            mine = lambda: [x for x in lines if x.startswith(trace_id[:8])]  # noqa: E731
            printed = wait_for(lambda: len(mine()) == 5 and mine(), 60, "the request's five spans printed")
            assert {x.split()[1] for x in printed} == {"infer", *STAGES} and all(" ms " in x for x in printed)
        finally:
            oip.stop(tmp_path)
    finally:
        printer.terminate()
        printer.wait(30)
