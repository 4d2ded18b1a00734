"""The model lifecycle under load: the p99 latency while a new version is loaded, made the default and the old one
unloaded, against the same load with nothing changing; and what tracing costs, off and on.

A version is the same export copied with its card's version raised (its proof still holds: the model file is the
same bytes), so the swap measures the server's own cost (loading, warming at the largest batch in every worker,
switching, draining) and not a different model's speed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from bench import serving
from torchship.serve import oip
from torchship.serve.client import metric_series
from torchship.serve.loadtest import run_level
from torchship.serve.process import free_ports

CLIENTS = 64


def versions(export_dir: Path, root: Path, data_dir: Path) -> tuple[Path, Path]:
    """REPOSITORY/model/V (the export as its card numbers it, proven) and, staged beside it, the same as V + 1: an
    export folder exported twice holds version 2, not 1."""
    from torchship.export.proof.report import write_report
    from torchship.export.proof.verify import verify
    from torchship.handlers.card import ModelCard

    v = int(ModelCard.load(export_dir).version)
    one, two = root / "repository" / "model" / str(v), root / "staged" / str(v + 1)
    shutil.copytree(export_dir, one, ignore=shutil.ignore_patterns("model.pt2", "model.int8.onnx", "model.ts.pt"))
    report = verify(one, data_dir=data_dir)
    write_report(report, one)
    shutil.copytree(one, two)
    card = json.loads((two / "meta.json").read_text())
    (two / "meta.json").write_text(json.dumps({**card, "version": two.name}))
    return one, two


def p99(latencies: list[float]) -> float:
    return float(np.percentile(np.asarray(latencies) * 1000, 99)) if latencies else float("nan")


SLOW_S = "0.2"  # a bucket bound of the server's request histogram (handlers/oip/metrics.py LATENCY_BUCKETS)


def answered_slower(before: dict, after: dict, bound: str = SLOW_S) -> int:
    """Requests the server itself took longer than BOUND seconds over, between two reads of its /metrics."""

    def count(series: dict) -> float:
        name = "torchship_request_seconds"
        total = sum(v for (n, _), v in series.items() if n == f"{name}_count")
        within = sum(v for (n, lb), v in series.items() if n == f"{name}_bucket" and lb.get("le") == bound)
        return total - within

    return int(count(after) - count(before))


def swap(export_dir: Path, work: Path, data_dir: Path, seconds: float = 10, log=print) -> dict:
    """Steady load, then the same load across a swap: p99 of the requests in flight during the swap against p99 of
    the steady run, and every request's status."""
    from torchship.handlers.card import ModelCard

    one, two = versions(export_dir, work, data_dir)
    state, name = work / "state-swap", ModelCard.load(export_dir).name  # a folder of exports: served by card names
    bodies = serving.agreed(export_dir)
    oip.start(oip.OIPConfig.on_free_ports(str(one.parent.parent), name, str(state)), timeout=120)
    try:
        target = oip.load_target(state)
        run_level(target, bodies, 4, 30, 3000)  # warm, as every serving setup is
        log(f"  steady, {CLIENTS} clients ...")
        steady = run_level(target, bodies, CLIENTS, seconds, 10**6)
        timeline: list[tuple[float, float, int]] = []
        result: dict = {}
        loader = threading.Thread(
            target=lambda: result.update(level=run_level(target, bodies, CLIENTS, seconds, 10**6, timeline=timeline))
        )
        log("  the same load across a swap to the next version and the unloading of this one ...")
        series = metric_series(target.metrics_url)
        loader.start()
        time.sleep(seconds / 3)  # the swap happens in the middle of the run, not at its edges
        began = time.perf_counter()
        shutil.copytree(two, one.parent / two.name)
        oip.repository_call(state, "load", name)
        loaded = time.perf_counter()
        oip.repository_call(state, "unload", name, {"parameters": {"version": one.name}})
        ended = time.perf_counter()
        loader.join()
        slow = answered_slower(series, metric_series(target.metrics_url))
    finally:
        oip.stop(state)
    during = [end - start for start, end, _ in timeline if start <= ended and end >= began]
    level = result["level"]
    return {
        "clients": CLIENTS,
        "seconds": seconds,
        "steady_p99_ms": steady.latency_ms["p99"],
        "steady_p50_ms": steady.latency_ms["p50"],
        "steady_errors": steady.errors,
        "swap_p99_ms": p99(during),
        "swap_requests": len(during),
        "swap_ms": round((ended - began) * 1000, 1),
        "load_ms": round((loaded - began) * 1000, 1),
        "errors": level.errors,
        "requests": level.requests,
        "ratio": p99(during) / steady.latency_ms["p99"],
        # who stood still when the swap's p99 is high: the load client's own loop, or the server (its own timing)
        "client_stall_ms": level.client_stall_ms,
        f"server_over_{SLOW_S}s": slow,
    }


SINK = (  # a receiver that takes the spans without parsing them, in a process of its own
    "import sys, time; from torchship.serve.traces import OtlpSink; OtlpSink(int(sys.argv[1]), keep=False); "
    "time.sleep(1e9)"
)
TRACING = {"traces off": None, "traces 10 %": "0.1", "traces 100 %": "1.0"}  # OTEL_TRACES_SAMPLER_ARG
TRACING_GOALS = {"traces 10 %": 0.9, "traces 100 %": 0.7}  # c=16 throughput against tracing off, at least (issue 36)


def tracing_cost(export_dir: Path, work: Path, duration: float = 10, log=print) -> dict:
    """The OIP server with tracing off (no OTEL_* variable) and on at 10 % and 100 % sampling (a root sampler by
    ratio), exporting to a local receiver that takes the spans without parsing them (a collector is elsewhere),
    measured like every serving setup. The receiver is a process of its own: in the load client's, its threads took
    the client's GIL and the client's slowdown read as the server's."""
    (port,) = free_ports(1)
    sink = subprocess.Popen([sys.executable, "-c", SINK, str(port)], stdin=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        setups = {
            name: serving.Setup(
                "oip",
                env=()
                if ratio is None
                else (
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
                    ("OTEL_TRACES_SAMPLER", "traceidratio"),
                    ("OTEL_TRACES_SAMPLER_ARG", ratio),
                ),
            )
            for name, ratio in TRACING.items()
        }
        # the targets are c=16's: it gets c=4's time too, in twice the rounds, against their noise (NOTES lever 73)
        return serving.compare(
            export_dir,
            work,
            setups,
            duration,
            rounds=6,
            concurrency=(16,),
            log=log,
            loaded_rounds=2 * serving.LOADED_ROUNDS,
            loaded_seconds=2 * duration,
        )
    finally:
        sink.terminate()
        sink.wait(30)


def run(export_dir: Path, work: Path, data_dir: Path, duration: float = 10, log=print) -> dict:
    return {
        "swap": swap(export_dir, work / "swap", data_dir, duration, log),
        "tracing": tracing_cost(export_dir, work / "tracing", duration, log),
    }


def table(section: dict) -> list[str]:
    s = section["swap"]
    lines = [
        f"Swap under {s['clients']} clients: the next version loaded and warmed in every worker, made the "
        f"default, the old one unloaded, in {s['swap_ms']:.0f} ms (the load {s['load_ms']:.0f} ms)",
        f"  p99 of the {s['swap_requests']} requests in flight meanwhile {s['swap_p99_ms']:.1f} ms against "
        f"{s['steady_p99_ms']:.1f} ms steady ({s['ratio']:.2f}x); failed: {sum(s['errors'].values())} of "
        f"{s['requests']}",
    ]
    if "client_stall_ms" in s:
        lines.append(
            f"  the load client's loop stood still at most {s['client_stall_ms']:.0f} ms; the server took over "
            f"{SLOW_S} s for {s[f'server_over_{SLOW_S}s']} requests"
        )
    t = section["tracing"]
    lines.append(
        "Tracing: "
        + "; ".join(
            f"{name}: c=1 p50 {serving_level(t[name], 1)['latency_ms']['p50']:.2f} ms, c=16 "
            f"{serving_level(t[name], 16)['throughput']:.0f} req/s"
            for name in TRACING
            if "levels" in t.get(name, {})
        )
    )
    return lines


def serving_level(setup: dict, c: int) -> dict:
    return next(lv for lv in setup["levels"] if lv["concurrency"] == c)
