"""Serving: every server on the same model, the same digits and the same load test, measured one at a time.

Setups are TorchServe (its stock MNIST example, or our handler), our Open Inference Protocol server, the peers people
pick instead (bench/peer_setup.py) and a do-nothing ceiling (bench/ceiling.py). They take turns: this machine's
speed drifts by tens of percent over minutes, so c=1 is measured in alternating short rounds and each setup's rounds
are pooled; then each runs c=4 and c=16. Every answer is checked against in-process ONNX Runtime.

Only the setup being measured runs: the others are paused (SIGSTOP) meanwhile, because some servers keep a core
busy while idle (LitServe's workers poll their queues) and would take it from whichever server is being measured.
Each setup's own idle CPU is measured and reported.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from contextlib import ExitStack, suppress
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import psutil

from bench import peer_setup
from torchship.handlers.model.onnx_model import load as load_onnx
from torchship.serve import oip, torchserve
from torchship.serve.archive import ModelConfig, build_archive
from torchship.serve.client import Target
from torchship.serve.loadtest import Level, Payload, kill_worker_under_load, payloads, percentiles, run_level
from torchship.serve.process import free_ports

BASELINE_HANDLER = Path(__file__).with_name("baseline_handler.py")
WARMUP = 3000  # requests at c=4 before anything is measured: JITs, caches, lazy initialisation


@dataclass(frozen=True)
class Setup:
    kind: str  # torchserve | oip | peer | ceiling
    backend: str = "onnx"
    config: ModelConfig | None = None  # torchserve: None is TorchServe's defaults
    handler: Path | None = None  # torchserve: a handler file of our own instead of torchship's
    peer: str | None = None
    protocol: str = "v2"  # oip: what the load test sends (serve/client.py: v2 binary, or v2 JSON with base64); every
    # kind: "v2-text", a text model's rows, sent to each server as v2 JSON's `text` input
    outputs: str = "all"  # oip: which outputs it asks for (serve/client.py OUTPUTS)
    env: tuple[tuple[str, str], ...] = ()  # oip: environment variables the server starts with (OTEL_*)

    def describe(self) -> dict:
        if self.kind == "torchserve":
            return {
                "kind": self.kind,
                "backend": self.backend,
                "handler": "stock MNIST" if self.handler else "torchship",
                "config": asdict(self.config) if self.config else "TorchServe defaults",
            }
        if self.kind == "peer":
            return {
                "kind": self.kind,
                "peer": self.peer,
                "settings": peer_setup.PEERS[self.peer].settings,
                "sends": peer_setup.PEERS[self.peer].protocol,
            }
        if self.kind == "oip":
            return {"kind": self.kind, "sends": self.protocol, "outputs": self.outputs, "env": dict(self.env)}
        return {"kind": self.kind}


def slug(name: str) -> str:
    return name.replace(" ", "-")


class Processes:
    """A started setup's processes, to pause while another is measured and to measure while idle."""

    def __init__(self, root_pid: int):
        self.root = root_pid

    def all(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.root)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def pause(self) -> None:
        for p in self.all():
            with suppress(psutil.Error):
                p.suspend()

    def resume(self) -> None:
        for p in self.all():
            with suppress(psutil.Error):
                p.resume()

    def memory_mb(self) -> float:
        """Proportional set size of the setup's processes, summed: what it holds of this machine's memory, pages
        its forked workers share counted once (resident size would count them in every worker)."""
        total = 0
        for p in self.all():
            with suppress(psutil.Error):
                total += p.memory_full_info().pss
        return round(total / 2**20, 1)

    def idle_cpu(self, seconds: float = 3) -> float:
        """Percent of one core the setup uses while nobody asks it anything."""

        def used(procs) -> float:
            total = 0.0
            for p in procs:
                with suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system
            return total

        procs = self.all()
        before = used(procs)
        time.sleep(seconds)
        return round(100 * (used(procs) - before) / seconds, 1)


def start(name: str, setup: Setup, export_dir: Path, work: Path, stack: ExitStack) -> tuple[Target, dict, int]:
    """Start one setup, register its stop on `stack`, and say what was started (versions, settings) and its root
    process."""
    state = work / f"state-{slug(name)}"
    if setup.kind == "torchserve":
        store = work / f"store-{slug(name)}"
        build_archive(
            export_dir, store, name="mnist", backend=setup.backend, config=setup.config, handler=setup.handler
        )
        stack.callback(torchserve.stop, state)
        cfg = torchserve.start(torchserve.ServerConfig.on_free_ports("mnist", str(store), str(state)), timeout=240)
        from importlib.metadata import version

        return torchserve.load_target(cfg.state_dir), {"version": version("torchserve")}, torchserve.pid(state)
    if setup.kind == "oip":
        stack.callback(oip.stop, state)
        saved = {k: os.environ.get(k) for k, _ in setup.env}
        os.environ.update(dict(setup.env))  # the supervisor and its workers inherit them
        try:
            oip.start(
                oip.OIPConfig.on_free_ports(str(export_dir), "mnist", str(state), backend=setup.backend), timeout=120
            )
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.update({k: v})
        target = replace(oip.load_target(state), protocol=setup.protocol, outputs=setup.outputs)
        return target, {"settings": oip.status(state).get("settings", {})}, oip.pid(state)
    if setup.kind == "ceiling":
        (port,) = free_ports(1)
        proc = subprocess.Popen([sys.executable, "-m", "bench.ceiling", str(port)], start_new_session=True)
        stack.callback(peer_setup.stop_process, proc)
        _wait_port(port)
        return Target("127.0.0.1", port, "mnist", protocol="raw"), {}, proc.pid
    running = peer_setup.start(peer_setup.PEERS[setup.peer], export_dir / "model.onnx", work / "peers")
    stack.callback(peer_setup.stop, running)
    target = running.target
    if setup.protocol == "v2-text":  # a text model: each peer's own way to take one text
        protocol, path = running.peer.text
        target = replace(target, protocol=protocol, path=path or target.path)
    return target, {"version": running.version}, running.proc.pid


def _wait_port(port: int, timeout: float = 30) -> None:
    import socket
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def agreed(export_dir: Path, n: int = 1000) -> list[Payload]:
    """Held-out digits, each labelled with in-process ONNX Runtime's answer: a served answer must equal it."""
    bodies = payloads(n=n)
    labels = [r["label"] for r in load_onnx(export_dir / "model.onnx").predict([p.body for p in bodies])]
    return [Payload(p.body, label) for p, label in zip(bodies, labels)]


def costed(procs: Processes, measure) -> Level:
    """A level, with the cores the server's processes and this client used meanwhile: on 2 cores shared by both, the
    CPU a request costs is what bounds requests/s, and a client that takes more leaves the server less."""
    import resource

    def server() -> float:
        total = 0.0
        for p in procs.all():
            with suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def client() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    s0, c0, t0 = server(), client(), time.perf_counter()
    lv = measure()
    seconds = time.perf_counter() - t0
    lv.server.update(server_cores=round((server() - s0) / seconds, 2), client_cores=round((client() - c0) / seconds, 2))
    return lv


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
    for key in ("queue_ms", "inference_ms", "rows_per_pass", "server_cores", "client_cores"):
        weight = "seconds" if key.endswith("cores") else "requests"  # cores are per second, the rest per request
        pairs = [(lv.server[key], getattr(lv, weight)) for lv in levels if key in lv.server]
        if pairs:
            server_ms[key] = round(sum(v * w for v, w in pairs) / sum(w for _, w in pairs), 3)
    judged = [lv for lv in levels if lv.accuracy == lv.accuracy]  # NaN when nothing came back to judge
    accuracy = sum(lv.accuracy * lv.requests for lv in judged) / max(sum(lv.requests for lv in judged), 1)
    return Level(
        "closed",
        levels[0].concurrency,
        None,
        n,
        dict(errors),
        seconds,
        n / max(seconds, 1e-9),
        percentiles(samples),
        accuracy,
        {"requests": n, **server_ms},
        answers,
    )


LOADED_ROUNDS = 4  # c=4 and c=16 are measured in this many alternating rounds per setup, like c=1 (bench/NOTES.md)


def compare(
    export_dir: Path,
    work: Path,
    setups: dict[str, Setup],
    duration: float = 10,
    rounds: int = 8,
    concurrency=(4, 16),
    after=None,
    log=print,
    bodies: list[Payload] | None = None,
    warmup: int = WARMUP,
    loaded_rounds: int = LOADED_ROUNDS,
    loaded_seconds: float | None = None,
) -> dict:
    """Every setup started, then measured one at a time (the rest paused): c=1 in alternating rounds, then the
    loaded levels in alternating rounds too, since this machine's speed drifts by tens of percent within minutes.

    A setup that cannot start is a result that says why. `after(name, target, state_dir)` runs on each setup while
    its server is still up (the worker-kill test). BODIES: labelled requests (default: the held-out digits).
    Each loaded level runs LOADED_SECONDS (default: DURATION) in all, in LOADED_ROUNDS rounds."""
    bodies = bodies or agreed(export_dir)
    levels: dict[str, list[Level]] = {}
    info, failed, extra = {}, {}, {}
    with ExitStack() as stack:
        targets, procs = {}, {}
        for name, setup in setups.items():
            log(f"  starting {name} ...")
            try:
                t0 = time.perf_counter()
                targets[name], info[name], root = start(name, setup, export_dir, work, stack)
                info[name]["ready_s"] = round(time.perf_counter() - t0, 1)
                procs[name] = Processes(root)
                stack.callback(procs[name].resume)  # a paused server cannot stop
                procs[name].pause()
            except Exception as e:  # a peer's own failure is a row of the table, not the end of the bench
                failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                log(f"  {name} could not start: {failed[name]}")
        names = [n for n in setups if n in targets]

        def alone(name: str, measure):
            """Run `measure` with only this setup's processes running."""
            procs[name].resume()
            try:
                return measure()
            finally:
                procs[name].pause()

        for name in names:
            info[name]["idle_cpu_percent"] = alone(name, procs[name].idle_cpu)
            alone(name, lambda n=name: run_level(targets[n], bodies, 4, 60, warmup))
            info[name]["memory_mb"] = procs[name].memory_mb()
        rounds_c1: dict[str, list[Level]] = {name: [] for name in names}
        samples: dict[str, list[float]] = {name: [] for name in names}
        log(f"  c=1 in {rounds} alternating rounds of {duration / 2:g} s ...")
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                rounds_c1[name].append(
                    alone(
                        name, lambda n=name: run_level(targets[n], bodies, 1, duration / 2, 30000, samples=samples[n])
                    )
                )
        for name in names:
            levels[name] = [pooled(rounds_c1[name], samples[name])]
        each = (loaded_seconds or duration) / loaded_rounds
        log(f"  c={', '.join(map(str, concurrency))} in {loaded_rounds} alternating rounds of {each:g} s ...")
        loaded = {(name, c): [] for name in names for c in concurrency}
        loaded_samples = {key: [] for key in loaded}

        def level_of(name: str, c: int) -> Level:
            return costed(
                procs[name], lambda: run_level(targets[name], bodies, c, each, 100000, samples=loaded_samples[name, c])
            )

        for r in range(loaded_rounds):  # each setup's levels side by side in time: drift hits c=4 and c=16 alike
            for name in names if r % 2 == 0 else names[::-1]:
                for c in concurrency if r % 2 == 0 else concurrency[::-1]:
                    loaded[name, c].append(alone(name, lambda n=name, c=c: level_of(n, c)))
        for name in names:
            levels[name] += [pooled(loaded[name, c], loaded_samples[name, c]) for c in concurrency]
        if after:
            for name in names:
                extra[name] = alone(name, lambda n=name: after(n, targets[n], work / f"state-{slug(n)}"))
    out = {name: {**setups[name].describe(), **info.get(name, {}), "error": failed[name]} for name in failed}
    for name in names:
        out[name] = {
            **setups[name].describe(),
            **info[name],
            "levels": [asdict(lv) for lv in levels[name]],
            **({"disruption": extra[name]} if name in extra else {}),
        }
    if len(names) >= 2:
        first = names[0]
        out["c1_rounds"] = {
            "seconds_each": duration / 2,
            "p50_ms": {name: [lv.latency_ms["p50"] for lv in rounds_c1[name]] for name in names},
            "p50_ratio_median_vs_first": {
                name: statistics.median(
                    o.latency_ms["p50"] / b.latency_ms["p50"] for o, b in zip(rounds_c1[name], rounds_c1[first])
                )
                for name in names[1:]
            },
            "first": first,
        }
    return out


# The OIP server as its clients call it: tritonclient's default (binary in, every output binary), curl's JSON (base64
# in, every output JSON), and the lightest answer (the label alone): the first is the one the targets judge.
OIP_SETUPS = {
    "oip": Setup("oip"),
    "oip-json": Setup("oip", protocol="v2-json"),
    "oip-label": Setup("oip", outputs="label"),
}


def run(
    export_dir: Path,
    work: Path,
    duration: float = 10,
    ours_config: ModelConfig | None = None,
    peers: tuple[str, ...] = tuple(peer_setup.PEERS),
) -> dict:
    """Stock TorchServe, our TorchServe, our OIP server, every peer and the ceiling, on one machine in one run."""
    setups = {
        "baseline": Setup("torchserve", "torchscript", None, BASELINE_HANDLER),
        "ours": Setup("torchserve", config=ours_config or ModelConfig()),
        **OIP_SETUPS,
        **{p: Setup("peer", peer=p) for p in peers},
        "ceiling": Setup("ceiling"),
    }
    return compare(export_dir, work, setups, duration)


def kill_one(name: str, target: Target, state_dir: Path) -> dict:
    """SIGKILL a worker under 64 clients' load: the requests that fail and how long nothing is answered."""
    import time

    pid = next(int(w["pid"]) for w in torchserve.status(state_dir)["workers"] if w.get("status") == "READY")
    _, d = kill_worker_under_load(target, pid, payloads(), concurrency=64, max_requests=6000)
    deadline = time.monotonic() + 60  # let TorchServe bring the worker back before the server is stopped
    while time.monotonic() < deadline and not all(
        w.get("status") == "READY" for w in torchserve.status(state_dir)["workers"]
    ):
        time.sleep(0.5)
    return asdict(d)


def workers(export_dir: Path, work: Path, duration: float = 10) -> dict:
    """What a second worker costs at c=1 and buys at c=16 and when a worker dies (issue: no single point of failure)."""
    d = ModelConfig()
    setups = {
        f"{n} worker{'s' if n > 1 else ''}": Setup("torchserve", config=replace(d, minWorkers=n, maxWorkers=n))
        for n in (1, 2)
    }
    return compare(export_dir, work, setups, duration, rounds=6, concurrency=(16,), after=kill_one)
