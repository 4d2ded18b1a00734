"""The OIP server at another commit against the working tree's, side by side in one run: did a change cost speed?

Both run as they ship (the runtime folder copied out as `torchship_handlers`, started with `python -m`), on the same
export, with the same fixed settings (2 workers, batches of 8, 1 ms, one thread: what sizing picks for the digit
model, fixed so that a measurement at start cannot differ between them). They take turns, the other paused
(SIGSTOP), in alternating rounds: REST with our load client (v2 binary) at c=1 and c=16, and gRPC with Triton's
perf_analyzer at c=1 and c=16, as it comes (its 16 clients share 3 connections) and with all 16 on one connection
(`grpc-one`: one HTTP/2 connection's calls, which only the worker holding it reads; `grpc-stream-one`: the same as
16 ModelStreamInfer streams, `--streaming`); and a large input (602 KB a
request, `triton_tools.large_input_export`) with perf_analyzer over gRPC and HTTP (`grpc-large`, `http-large`), where
moving the message is what a request costs. The result is each metric's per-round ratio, new over old, so that the
machine's drift over minutes cancels within a round.

python -m bench.run --only ab --baseline REF   (REF: any git commit, e.g. the one before a refactor)
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.request
from contextlib import ExitStack
from io import BytesIO
from pathlib import Path

from bench import triton_tools
from bench.serving import Processes, agreed
from torchship.serve.client import Target
from torchship.serve.loadtest import run_level
from torchship.serve.oip import METRIC_NAMES
from torchship.serve.process import free_ports
from torchship.serve.shipping import SHIPPED_NAME, copy_runtime

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"workers": 2, "max_batch": 8, "threads": 1}
DELAY_MS = 1
LEVELS = (
    ("rest", 1),
    ("rest", 16),
    ("grpc", 1),
    ("grpc", 16),
    ("grpc-one", 16),
    ("grpc-stream-one", 16),
    ("grpc-large", 1),
    ("grpc-large", 16),
    ("http-large", 1),
)
ONE_CONNECTION = {"TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT": "16"}  # perf_analyzer's clients per channel (default 6)


def runtime_at(ref: str, dest: Path) -> Path:
    """The runtime folder as commit REF had it, as DEST/torchship_handlers (git archive: no checkout is touched)."""
    blob = subprocess.run(["git", "archive", ref, "handlers"], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(blob)) as tar:
        tar.extractall(dest, filter="data")
    shutil.rmtree(dest / SHIPPED_NAME, ignore_errors=True)  # a work folder used before
    (dest / "handlers").rename(dest / SHIPPED_NAME)
    return dest


def command(root: Path, export_dir: Path, http_port: int, grpc_port: int, model: str = "mnist") -> list[str]:
    """The server's command line in its own version's spelling (before the runtime had folders: oip_server). MODEL
    other than the digits: served as Triton's image examples want it (its tensor input alone, for perf_analyzer)."""
    package = root / SHIPPED_NAME
    flat = (package / "oip_server.py").is_file()
    module, delay = (f"{SHIPPED_NAME}.oip_server", "max_delay_ms") if flat else (f"{SHIPPED_NAME}.oip", None)
    flags = {
        "model_dir": export_dir,
        "model_name": model,
        "http_port": http_port,
        "grpc_port": grpc_port,
        **SETTINGS,
        delay or "max_batch_delay_ms": DELAY_MS,
        "log_level": "WARNING",
    }
    images = () if model == "mnist" else ("--triton_images",)
    return [sys.executable, "-m", module, *(f"--{k}={v}" for k, v in flags.items()), *images]


def start(root: Path, export_dir: Path, stack: ExitStack, model: str = "mnist") -> tuple[Target, dict, Processes]:
    """The server, ready: its REST target, its perf_analyzer URLs by protocol, its processes."""
    http_port, grpc_port = free_ports(2)
    cmd = command(root, export_dir.resolve(), http_port, grpc_port, model)
    proc = subprocess.Popen(cmd, cwd=root, start_new_session=True)
    stack.callback(lambda: (proc.terminate(), proc.wait(30)))
    url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{root.name}'s server exited during start-up (code {proc.returncode})")
        time.sleep(0.2)
    else:
        raise RuntimeError(f"{root.name}'s server was not ready after 120 s")
    target = Target("127.0.0.1", http_port, model, protocol="v2", metrics_url=url, metric_names=METRIC_NAMES)
    return target, {"grpc": f"127.0.0.1:{grpc_port}", "http": f"127.0.0.1:{http_port}"}, Processes(proc.pid)


def run(export_dir: Path, work: Path, baseline: str, rounds: int = 6, seconds: float = 5, log=print) -> dict:
    """Per level and round: the baseline's and the working tree's c=1 p50 (ms) and requests/s, and their ratios."""
    work.mkdir(parents=True, exist_ok=True)
    roots = {"old": runtime_at(baseline, work / "old"), "new": work / "new"}
    shutil.rmtree(roots["new"], ignore_errors=True)
    copy_runtime(roots["new"])
    bodies = agreed(export_dir)
    pa = triton_tools.installed()
    data = triton_tools.input_files(export_dir, work)["images"]
    large = triton_tools.large_input_export(work / "large")
    large_data = triton_tools.large_input_file(large, work)
    out: dict = {
        "baseline": baseline,
        "rounds": rounds,
        "seconds": seconds,
        "settings": {**SETTINGS, "delay": DELAY_MS},
    }
    results = {(name, level): [] for name in roots for level in LEVELS}
    with ExitStack() as stack:
        servers = {}
        for name, root in roots.items():
            for model, folder in (("mnist", export_dir), ("large", large)):
                log(f"  starting the {name} server ({baseline if name == 'old' else 'working tree'}) for {model} ...")
                servers[name, model] = start(root, folder, stack, model)
                stack.callback(servers[name, model][2].resume)  # a paused server cannot stop
                servers[name, model][2].pause()

        def measure(name: str, protocol: str, c: int) -> dict:
            model = "large" if protocol.endswith("-large") else "mnist"
            target, urls, procs = servers[name, model]
            procs.resume()
            try:
                if protocol == "rest":
                    lv = run_level(target, bodies, c, seconds, 200_000)
                    return {
                        "throughput": lv.throughput,
                        "p50_ms": lv.latency_ms["p50"],
                        "errors": sum(lv.errors.values()),
                    }
                binary, env = pa
                env = {**env, **ONE_CONNECTION} if protocol.endswith("-one") else env
                how = "http" if protocol == "http-large" else "grpc"
                given = large_data if model == "large" else data
                extra = ("--streaming",) if protocol.startswith("grpc-stream") else ()
                return triton_tools.measure(binary, env, urls[how], how, given, c, seconds, extra, model=model)
            finally:
                procs.pause()

        for name in roots:  # warm: JITs, caches, lazy initialisation
            measure(name, "rest", 4)
            measure(name, "grpc", 4)
            measure(name, "grpc-large", 4)
        for r in range(rounds):
            order = list(roots) if r % 2 == 0 else list(roots)[::-1]
            log(f"  round {r + 1} of {rounds} ({' then '.join(order)}) ...")
            for level in LEVELS:
                for name in order:
                    results[name, level].append(measure(name, *level))
    out["levels"] = []
    for level in LEVELS:
        old, new = results["old", level], results["new", level]
        key = "p50_ms" if level[1] == 1 else "throughput"
        ratios = [round(n[key] / o[key], 3) for o, n in zip(old, new) if key in o and key in n]
        out["levels"].append(
            {
                "protocol": level[0],
                "concurrency": level[1],
                "metric": key,
                "old": [o.get(key) for o in old],
                "new": [n.get(key) for n in new],
                "ratios": ratios,
                "median_ratio": round(statistics.median(ratios), 3) if ratios else None,
                "errors": sum(x.get("errors", 0) + ("error" in x) for x in old + new),
            }
        )
    return out


def table(section: dict) -> list[str]:
    lines = [
        f"The OIP server, {section['baseline']} (old) against the working tree (new), {section['rounds']} alternating "
        f"rounds of {section['seconds']:g} s; REST: our client, v2 binary; gRPC: perf_analyzer",
        f"{'level':<12} {'metric':<11} {'old (median)':>12} {'new (median)':>12} "
        f"{'new/old per round':<44} {'median':>6}",
    ]
    for lv in section["levels"]:
        old = statistics.median([x for x in lv["old"] if x is not None] or [float("nan")])
        new = statistics.median([x for x in lv["new"] if x is not None] or [float("nan")])
        per_round = ", ".join(f"{x:.2f}" for x in lv["ratios"])
        lines.append(
            f"{lv['protocol'] + ' c=' + str(lv['concurrency']):<12} {lv['metric']:<11} {old:>12.3f} {new:>12.3f} "
            f"{per_round:<44} {lv['median_ratio']!s:>6}"
        )
    return lines
