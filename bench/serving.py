"""Serving: TorchServe as its stock MNIST example runs it vs `make serve`'s defaults, same load test.

Both servers run at once and take turns: this machine's speed drifts by tens of percent over minutes,
so c=1 is measured in alternating short rounds and each setup's rounds are pooled; the paired
per-round ratios are kept to show how steady the comparison was.
"""

from __future__ import annotations

import statistics
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, replace
from pathlib import Path

from torchship.serve import kserve, torchserve
from torchship.serve.archive import ModelConfig, build_archive
from torchship.serve.loadtest import Level, Target, kill_worker_under_load, payloads, percentiles, run_level

BASELINE_HANDLER = Path(__file__).with_name("baseline_handler.py")


def start(name: str, export_dir: Path, work: Path, backend: str, config: ModelConfig | None, handler: Path | None):
    store, state = work / f"store-{slug(name)}", work / f"state-{slug(name)}"
    if backend == "kserve":  # the Open Inference Protocol runtime serves the export directly
        kserve.start(kserve.KServeConfig.on_free_ports(str(export_dir), "mnist", str(state)), timeout=120)
        return kserve.load_target(state)
    build_archive(export_dir, store, name="mnist", backend=backend, config=config, handler=handler)
    cfg = torchserve.start(torchserve.ServerConfig.on_free_ports("mnist", str(store), str(state)), timeout=240)
    key = torchserve.keys(state).get("inference", {}).get("key")
    return Target("127.0.0.1", cfg.inference_port, "mnist", key, cfg.metrics_url)


def slug(name: str) -> str:
    return name.replace(" ", "-")


def pooled(levels: list[Level], samples: list[float]) -> Level:
    """One level out of several rounds at the same concurrency: counts summed, percentiles over every request."""
    n = sum(lv.requests for lv in levels)
    seconds = sum(lv.seconds for lv in levels)
    errors: Counter = Counter()
    for lv in levels:
        errors.update(lv.errors)
    answers = [-1] * max(len(lv.answers) for lv in levels)
    for lv in levels:
        for i, a in enumerate(lv.answers):
            if a >= 0:
                answers[i] = a if answers[i] < 0 else min(answers[i], a)
    server_ms = {}
    for key in ("queue_ms", "inference_ms"):
        pairs = [(lv.server[key], lv.server["requests"]) for lv in levels if key in lv.server]
        if pairs:
            server_ms[key] = sum(v * w for v, w in pairs) / sum(w for _, w in pairs)
    return Level("closed", levels[0].concurrency, None, n, dict(errors), seconds, n / max(seconds, 1e-9),
                 percentiles(samples), sum(lv.accuracy * lv.requests for lv in levels) / max(n, 1),
                 {"requests": n, **server_ms}, answers)  # fmt: skip


def compare(export_dir: Path, work: Path, setups: dict, duration: float = 10, rounds: int = 8,
            concurrency=(4, 16), after=None) -> dict:  # fmt: skip
    """Every setup (name -> (backend, config, handler)) up at once: c=1 in alternating rounds, then each level.

    `after(name, target, state_dir)` runs on each setup while its server is still up (the worker-kill test)."""
    names = tuple(setups)
    bodies = payloads()
    levels: dict[str, list[Level]] = {name: [] for name in names}
    extra = {}
    with ExitStack() as stack:
        targets = {}
        for name, (backend, config, handler) in setups.items():
            stack.callback(kserve.stop if backend == "kserve" else torchserve.stop, work / f"state-{slug(name)}")
            targets[name] = start(name, export_dir, work, backend, config, handler)
        for name in names:  # warm the workers and the JVM's JIT: first calls pay for lazy init and interpretation
            run_level(targets[name], bodies, 4, 30, 3000)
        rounds_c1: dict[str, list[Level]] = {name: [] for name in names}
        samples: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                rounds_c1[name].append(run_level(targets[name], bodies, 1, duration / 2, 30000, samples=samples[name]))
        for name in names:
            levels[name].append(pooled(rounds_c1[name], samples[name]))
        for c in concurrency:
            for name in names:
                levels[name].append(run_level(targets[name], bodies, c, duration, 30000))
        if after:
            extra = {name: after(name, targets[name], work / f"state-{slug(name)}") for name in names}
    first, second = names[0], names[1]
    ratios = [o.latency_ms["p50"] / b.latency_ms["p50"] for o, b in zip(rounds_c1[second], rounds_c1[first])]
    versus = {name: statistics.median(o.latency_ms["p50"] / b.latency_ms["p50"] for o, b in
                                      zip(rounds_c1[name], rounds_c1[first])) for name in names[1:]}  # fmt: skip
    return {
        **{
            name: {
                "backend": setups[name][0],
                "config": asdict(setups[name][1]) if setups[name][1] else "TorchServe defaults",
                "levels": [asdict(lv) for lv in levels[name]],
                **({"disruption": extra[name]} if name in extra else {}),
            }
            for name in names
        },
        "c1_rounds": {
            "pair": [second, first],
            "seconds_each": duration / 2,
            f"{first}_p50_ms": [lv.latency_ms["p50"] for lv in rounds_c1[first]],
            f"{second}_p50_ms": [lv.latency_ms["p50"] for lv in rounds_c1[second]],
            "p50_ratios": ratios,
            "p50_ratio_median": statistics.median(ratios),
            "p50_ratio_median_vs_first": versus,
            "p50_ms": {name: [lv.latency_ms["p50"] for lv in rounds_c1[name]] for name in names},
        },
    }


def run(export_dir: Path, work: Path, duration: float = 10, ours_config: ModelConfig | None = None) -> dict:
    """TorchServe's stock MNIST setup against `make serve`'s defaults and the KServe runtime, all up at once."""
    setups = {"baseline": ("torchscript", None, BASELINE_HANDLER), "ours": ("onnx", ours_config or ModelConfig(), None),
              "kserve": ("kserve", None, None)}  # fmt: skip
    return compare(export_dir, work, setups, duration)


def kill_one(name: str, target: Target, state_dir: Path) -> dict:
    """SIGKILL a worker under 64 clients' load: the requests that fail and how long nothing is answered."""
    import time

    pid = next(int(w["pid"]) for w in torchserve.status(state_dir)["workers"] if w.get("status") == "READY")
    _, d = kill_worker_under_load(target, pid, payloads(), concurrency=64, max_requests=6000)
    deadline = time.monotonic() + 60  # let TorchServe bring the worker back before the server is stopped
    while time.monotonic() < deadline and not all(w.get("status") == "READY" for w in
                                                   torchserve.status(state_dir)["workers"]):  # fmt: skip
        time.sleep(0.5)
    return asdict(d)


def workers(export_dir: Path, work: Path, duration: float = 10) -> dict:
    """What a second worker costs at c=1 and buys at c=16 and when a worker dies (issue: no single point of failure)."""
    d = ModelConfig()
    setups = {f"{n} worker{'s' if n > 1 else ''}": ("onnx", replace(d, minWorkers=n, maxWorkers=n), None)
              for n in (1, 2)}  # fmt: skip
    return compare(export_dir, work, setups, duration, rounds=6, concurrency=(16,), after=kill_one)
