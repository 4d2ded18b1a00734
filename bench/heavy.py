"""make bench's real-sized models (issue 36): ResNet-50 (3x224x224, torchvision's architecture) and a BERT-base-shaped
sequence classifier (12 layers, hidden 768, 128 tokens), each with fixed-seed weights, served by the OIP server at
c=1, 4 and 16 beside the model's ceiling on this machine: the best throughput of in-process ONNX Runtime over batch
sizes and thread layouts that use every core, and its best batch-1 latency (both measured again in turns with the
served c=16 and c=1 levels, against which those are judged: lever 70). The settings the server picks by itself
(handlers/sizing.py) are checked against a small grid of workers x threads x batch run here. BERT is also served as
int8 (ONNX Runtime's dynamic quantization, proven by top-1 agreement).

python -m bench.run --only heavy [--duration S]
"""

from __future__ import annotations

import json
import shutil
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from bench import detector
from bench.real_models import MODELS, build_bert, build_resnet, images, text_payloads, texts
from torchship.handlers import sizing
from torchship.handlers.card import ModelCard
from torchship.serve import oip
from torchship.serve.client import Target
from torchship.serve.loadtest import Payload, run_level

CONCURRENCY = (1, 4, 16)
BATCHES = (1, 2, 4, 8)  # the ceiling's batch sizes (a ResNet-50 pass of 8 on one thread takes ~1.5 s here)
GRID_BATCHES = (1, 8)  # the served grid's largest batches
RUNS = 3  # the ceiling and the chosen setting's levels, measured this many times: the machine drifts
ROUNDS = 3  # within a run, the served c=1 and c=16 levels in turns with the ceiling measured again
BERT_LOADED = 4  # BERT-base's loaded levels against the peers run 4x the level's seconds: 4 rounds of 10 s


def layouts(n: int) -> dict[str, tuple[int, int, int, int]]:
    """(workers, intra-op threads of a lone pass, passes at once, threads of a pass beside others) that use all N
    cores: one worker with all of them, one worker a core, two workers with all of them each (oversubscribed while
    both run), two with all of them taking turns (lever 59), and two whose lone pass takes all of them and whose
    passes at once their share each (lever 64: the rule's choice for a heavy model)."""
    return {
        "one worker": (1, n, 1, n),
        "a worker a core": (n, 1, n, 1),
        "oversubscribed": (2, n, 2, n),
        "turns": (2, n, 1, n),
        "adaptive": (2, n, n, max(1, n // 2)),
    }


def grid_layouts() -> list[tuple[int, int, int, int]]:
    return list(dict.fromkeys(layouts(sizing.cores()).values()))


def model_inputs(export: Path, card: ModelCard, bodies: list[Payload], kind: str) -> list[dict]:
    """What the model file takes for each body, prepared by the export's own runtime (decode or tokenizer)."""
    if kind == "image":
        from torchship.handlers.model.onnx_model import load as load_onnx

        model = load_onnx(str(export / "model.onnx"))
        return [{card.input_name: model.prepare(p.body)[None]} for p in bodies]
    from torchship.handlers.model import steps

    step = steps.load(card.signature, export)
    out = []
    for p in bodies:
        out.append(step.check({"text": ("BYTES", (1,), np.array([p.body], dtype=object))}).arrays)
    return out


def stacked(rows: list[dict], batch: int) -> dict:
    return {k: np.concatenate([r[k] for r in rows[:batch]]) for k in rows[0]}


def batches_of(rows: list[dict], batch: int) -> list[dict]:
    """Every BATCH consecutive rows as one input: the in-process figures pass over the inputs the served levels send,
    not the first alone (a text's length or a detector's NMS could make one dearer; measured, none was here)."""
    return [stacked(rows[i : i + batch], batch) for i in range(0, len(rows) - batch + 1, batch)]


def session(model_file: Path, threads: int):
    """An in-process ONNX Runtime session: its defaults, THREADS intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])


def timed(s, xs: list[dict], until: float) -> list[float]:
    s.run(None, xs[0])  # warm
    times = []
    while len(times) < 2 or time.perf_counter() < until:
        x = xs[len(times) % len(xs)]
        t = time.perf_counter()
        s.run(None, x)
        times.append(time.perf_counter() - t)
    return times


def pass_rate(made: list, xs: list[dict], b: int, seconds: float) -> float:
    """Items/s of SESSIONS running at once, each on a thread of its own."""
    results: list[list[float]] = [[] for _ in made]
    until = time.perf_counter() + seconds
    workers = [threading.Thread(target=lambda s=s, r=r: r.extend(timed(s, xs, until))) for s, r in zip(made, results)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(b / statistics.median(r) for r in results)


def ceiling(model_file: Path, rows: list[dict], seconds: float, batches: tuple[int, ...] = BATCHES) -> dict:
    """In-process ONNX Runtime (its defaults, intra-op threads set) on every core: S sessions x T threads (S x T =
    cores, the sessions run at once on threads of their own) at each batch; the best items/s, and the best batch-1
    latency over thread counts."""
    cores = sizing.cores()
    grid = []
    for sessions, threads in dict.fromkeys([(1, cores), (cores, 1)]):
        made = [session(model_file, threads) for _ in range(sessions)]
        for b in batches:
            rate = pass_rate(made, batches_of(rows, b), b, seconds)
            grid.append({"sessions": sessions, "threads": threads, "batch": b, "items_per_s": rate})
    latency = {}
    for threads in sorted({1, cores}):
        made = session(model_file, threads)
        latency[threads] = statistics.median(timed(made, batches_of(rows, 1), time.perf_counter() + seconds)) * 1000
    best = max(grid, key=lambda g: g["items_per_s"])
    return {"grid": grid, "best": best, "batch1_ms": latency, "best_batch1_ms": min(latency.values())}


def cpu_times() -> tuple[int, int]:
    """(steal, all) of the machine's CPU time so far, in ticks: steal is the time the hypervisor ran another guest
    while ours had work (/proc/stat's eighth column), the one drift a run can see from inside."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (ticks[7] if len(ticks) > 7 else 0), sum(ticks[:8])


def steal_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    return (after[0] - before[0]) / max(1, after[1] - before[1])


def serve(export: Path, name: str, state: Path, settings: dict):
    cfg = oip.OIPConfig.on_free_ports(str(export), name, str(state), **settings)
    return oip.start(cfg, timeout=600)


def target(cfg, name: str, kind: str) -> Target:
    if kind == "detect":  # every output, binary: a detector has no label to ask for alone
        return Target("127.0.0.1", cfg.http_port, name, protocol="v2")
    if kind == "image":
        return Target("127.0.0.1", cfg.http_port, name, protocol="v2", outputs="label")
    return Target("127.0.0.1", cfg.http_port, name, protocol="v2-text")


def level_dict(lv) -> dict:
    return {
        "concurrency": lv.concurrency,
        "throughput": lv.throughput,
        "p50_ms": lv.latency_ms["p50"],
        "p99_ms": lv.latency_ms["p99"],
        "requests": lv.requests,
        "errors": lv.errors,
    }


def chosen_settings(export: Path) -> dict:
    """What the server decides when given nothing (the supervisor's rule in handlers/sizing.py)."""
    card = ModelCard.load(export)
    cost = sizing.measure(export, "onnx", card)
    s = sizing.sized(cost)
    return {
        "workers": s.workers,
        "threads": s.threads,
        "max_batch": s.max_batch,
        "max_batch_delay_ms": s.max_batch_delay_ms,
        "pass_slots": s.pass_slots,
        "busy_threads": s.busy_threads,
    }


def served_levels(export, name, kind, bodies, state, settings, seconds, levels=CONCURRENCY) -> list[dict]:
    cfg = serve(export, name, state, settings)
    try:
        t = target(cfg, name, kind)
        run_level(t, bodies, 4, min(seconds, 3), 10**6)  # warm: JIT, caches, the first passes at every batch
        out = []
        for c in levels:
            lv = run_level(t, bodies, c, seconds, 10**6)
            out.append(level_dict(lv))
        return out
    finally:
        oip.stop(state)


def pooled(concurrency: int, levels: list, samples: list[float]) -> dict:
    """One level out of several rounds of it: throughput over their summed time, latency over all their requests."""
    ms = sorted(x * 1000 for x in samples) or [float("nan")]
    errors: dict[str, int] = {}
    for lv in levels:
        for k, n in lv.errors.items():
            errors[k] = errors.get(k, 0) + n
    return {
        "concurrency": concurrency,
        "throughput": sum(lv.requests for lv in levels) / sum(lv.seconds for lv in levels),
        "p50_ms": ms[len(ms) // 2],
        "p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))],
        "requests": sum(lv.requests for lv in levels),
        "errors": errors,
    }


def against_ceiling(
    export: Path,
    name: str,
    kind: str,
    bodies: list[Payload],
    state: Path,
    *,
    settings: dict,
    seconds: float,
    rows: list[dict],
    top: dict,
) -> dict:
    """The chosen setting served at c=4, and at c=16 and c=1 in ROUNDS turns with the ceiling's best layout and its
    best batch-1 latency measured again in-process beside the idle server, each phase with the CPU time stolen from
    the machine: two figures taken minutes apart on this machine measure its drift as much as the server
    (bench/NOTES.md lever 70)."""
    best, lone_threads = top["best"], min(top["batch1_ms"], key=top["batch1_ms"].get)
    model_file = export / "model.onnx"
    made = [session(model_file, best["threads"]) for _ in range(best["sessions"])]
    lone = session(model_file, int(lone_threads))
    wide, one = batches_of(rows, best["batch"]), batches_of(rows, 1)
    cfg = serve(export, name, state, settings)
    rounds, c16, c1, c16_ms, c1_ms = [], [], [], [], []
    try:
        t = target(cfg, name, kind)
        run_level(t, bodies, 4, min(seconds, 3), 10**6)  # warm: JIT, caches, the first passes at every batch
        c4 = level_dict(run_level(t, bodies, 4, seconds, 10**6))
        for _ in range(ROUNDS):
            marks = [cpu_times()]
            rate = pass_rate(made, wide, best["batch"], min(seconds, 4))
            marks.append(cpu_times())
            c16.append(run_level(t, bodies, 16, seconds, 10**6, samples=c16_ms))
            marks.append(cpu_times())
            latency = statistics.median(timed(lone, one, time.perf_counter() + min(seconds, 4))) * 1000
            marks.append(cpu_times())
            c1.append(run_level(t, bodies, 1, seconds / 2, 10**6, samples=c1_ms))
            marks.append(cpu_times())
            steal = [steal_share(a, b) for a, b in zip(marks, marks[1:])]
            rounds.append(
                {
                    "ceiling_items_per_s": rate,
                    "c16": c16[-1].throughput,
                    "batch1_ms": latency,
                    "c1_p50_ms": c1[-1].latency_ms["p50"],
                    "steal": dict(zip(("ceiling", "c16", "batch1", "c1"), steal)),
                }
            )
    finally:
        oip.stop(state)
    return {
        "levels": [pooled(1, c1, c1_ms), c4, pooled(16, c16, c16_ms)],
        "rounds": rounds,
        "ceiling_items_per_s": statistics.mean(r["ceiling_items_per_s"] for r in rounds),
        "batch1_ms": statistics.median(r["batch1_ms"] for r in rounds),
    }


def one_model(
    export: Path, name: str, kind: str, bodies: list[Payload], work: Path, seconds: float, log, runs: int
) -> dict:
    card = ModelCard.load(export)
    rows = model_inputs(export, card, bodies, kind)
    chosen = chosen_settings(export)
    log(f"  {name}: the server's own choice {chosen}")
    grid = []
    for workers, threads, slots, busy in grid_layouts():
        for batch in GRID_BATCHES:
            settings = {"workers": workers, "threads": threads, "pass_slots": slots, "busy_threads": busy}
            settings.update(max_batch=batch, max_batch_delay_ms=2)
            log(f"  {name}: grid {settings} at c=16 ...")
            lv = served_levels(export, name, kind, bodies, work / "state", settings, seconds, levels=(16,))[0]
            grid.append({**settings, **lv})
    measured = in_turns(export, name, kind, bodies, work, chosen=chosen, seconds=seconds, rows=rows, runs=runs, log=log)
    return {"model": name, "chosen": chosen, "grid": grid, "runs": measured}


def in_turns(
    export: Path,
    name: str,
    kind: str,
    bodies: list[Payload],
    work: Path,
    *,
    chosen: dict,
    seconds: float,
    rows,
    runs: int,
    log,
    batches: tuple[int, ...] = BATCHES,
) -> list[dict]:
    """RUNS times: the ceiling, then the chosen setting served in turns with it (against_ceiling)."""
    measured = []
    for r in range(runs):
        log(f"  {name}: run {r + 1} of {runs}: the ceiling, then the chosen setting in turns with it ...")
        top = ceiling(export / "model.onnx", rows, seconds=min(seconds, 4), batches=batches)
        paired = against_ceiling(
            export,
            name,
            kind,
            bodies,
            work / "state",
            settings=chosen,
            seconds=seconds,
            rows=rows,
            top=top,
        )
        measured.append({"ceiling": top, **paired})
    return measured


def image_case(export: Path) -> tuple[dict, list[Payload]]:
    """ResNet-50 served by the OIP server (its own choice of settings) and by each peer as bench/peer_setup.py sets it
    up for the digit model (2 workers, one ONNX Runtime thread each, batches up to 8), on the same JPEGs, each labelled
    with in-process ONNX Runtime's answer."""
    from bench import peer_setup, serving
    from torchship.handlers.model.onnx_model import load as load_onnx

    bodies = images()
    labels = [r["label"] for r in load_onnx(str(export / "model.onnx")).predict([p.body for p in bodies])]
    bodies = [Payload(p.body, label, p.content_type) for p, label in zip(bodies, labels)]
    setups = {"oip": serving.Setup("oip"), **{name: serving.Setup("peer", peer=name) for name in peer_setup.PEERS}}
    return setups, bodies


TEXT_PEERS = ("pytriton", "litserve", "mlserver", "bentoml")


def text_case(export: Path) -> tuple[dict, list[Payload]]:
    """BERT-base served by the OIP server (its own choice of settings) and by each peer, the same texts sent as v2
    JSON's `text` input (BentoML's batchable API: {"text": [it]}), each peer as bench/peer_setup.py sets it up (2
    workers, one ONNX Runtime thread each, batches up to 8), each labelled with in-process ONNX Runtime's answer."""
    from bench import serving
    from torchship.handlers.model.onnx_model import load as load_onnx

    sample = texts(export / "tokenizer.json", n=32)
    labels = [label.decode() for label in load_onnx(str(export / "model.onnx")).predict(sample)["label"]]
    bodies = [Payload(t.encode(), label, "text/plain") for t, label in zip(sample, labels)]
    setups = {
        "oip": serving.Setup("oip", protocol="v2-text"),
        **{name: serving.Setup("peer", peer=name, protocol="v2-text") for name in TEXT_PEERS},
    }
    return setups, bodies


def with_peers(
    export: Path, work: Path, seconds: float, log, case=image_case, warmup: int = 48, loaded: float = 1
) -> dict:
    """The model served by the OIP server and each peer (CASE: image_case or text_case), measured as `make bench`'s
    serving rows are, with shorter rounds; the loaded levels LOADED times SECONDS in all (BERT-base's passes of ~1 s
    leave a round of 2.5 s at c=16 ~20 requests: too few to order the servers, bench/NOTES.md)."""
    from bench import serving

    setups, bodies = case(export)
    return serving.compare(
        export, work, setups, seconds, rounds=2, bodies=bodies, warmup=warmup, log=log, loaded_seconds=loaded * seconds
    )


def footprint(export: Path, work: Path, log=print, case=image_case, warmup: int = 32) -> dict:
    """What a heavy model costs before it serves: each server started alone, the seconds until it answers ready, and
    its memory (PSS of all its processes) after WARMUP requests at c=4, beside the model file's size."""
    from contextlib import ExitStack

    from bench import serving

    setups, bodies = case(export)
    out = {"model_mb": round((export / "model.onnx").stat().st_size / 2**20, 1), "warmup": warmup, "servers": {}}
    for name, setup in setups.items():
        log(f"  {export.name}: starting {name} alone ...")
        shutil.rmtree(work / f"state-{serving.slug(name)}" / oip.CACHE, ignore_errors=True)  # a first start
        try:
            with ExitStack() as stack:
                t0 = time.perf_counter()
                target, info, root = serving.start(name, setup, export, work, stack)
                ready_s = time.perf_counter() - t0
                lv = run_level(target, bodies, 4, 600, warmup)
                procs = serving.Processes(root)
                out["servers"][name] = {
                    **{k: v for k, v in info.items() if k in ("version", "settings")},
                    "ready_s": round(ready_s, 1),
                    "memory_mb": procs.memory_mb(),
                    "processes": len(procs.all()),
                    "warmup_agreement": lv.accuracy,
                    "warmup_errors": sum(lv.errors.values()),
                }
            if setup.kind == "oip":  # started again on what the first start kept (--cache_dir, lever 82)
                with ExitStack() as stack:
                    t0 = time.perf_counter()
                    target, _, _ = serving.start(name, setup, export, work, stack)
                    out["servers"][name]["restart_s"] = round(time.perf_counter() - t0, 1)
                    lv = run_level(target, bodies, 4, 600, warmup)
                    out["servers"][name]["restart_agreement"] = lv.accuracy
        except Exception as e:  # a peer's own failure is a row, not the end of the bench
            out["servers"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    return out


def footprint_lines(model: str, f: dict | None) -> list[str]:
    if not f:
        return []
    lines = [
        f"  {model} ({f['model_mb']:,.0f} MB of ONNX): started alone, ready after, memory (PSS) after {f['warmup']}"
        " requests"
    ]
    for name, s in f["servers"].items():
        if "error" in s:
            lines.append(f"    {name:<10} could not run: {s['error'][:100]}")
            continue
        again = f", again in {s['restart_s']:.1f} s" if "restart_s" in s else ""
        lines.append(
            f"    {name:<10} ready in {s['ready_s']:5.1f} s{again}, {s['memory_mb']:7,.0f} MB in {s['processes']}"
            f" process(es), agreement {s['warmup_agreement']:.3f}"
        )
    return lines


def int8_row(
    export: Path, name: str, bodies: list[Payload], work: Path, seconds: float, chosen: dict, log, runs: int
) -> dict:
    """BERT's int8 file served as its own export (the same folder, backend int8), against its own ceiling."""
    card = ModelCard.load(export)
    rows = model_inputs(export, card, bodies, "text")
    measured = []
    for r in range(runs):
        log(f"  {name} int8: run {r + 1} of {runs} ...")
        top = ceiling(export / "model.int8.onnx", rows, seconds=min(seconds, 4))
        levels = served_levels(
            export,
            name,
            "text",
            bodies,
            work / "state-int8",
            {**chosen, "backend": "onnx-int8"},
            seconds,
            levels=(1, 16),
        )
        measured.append({"ceiling": top, "levels": levels})
    proof = json.loads((export / "equivalence.json").read_text())
    return {"runs": measured, "approximations": proof.get("approximations", [])}


def run(work: Path, seconds: float = 10, log=print, runs: int = RUNS, peers: bool = True) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    log(f"  ResNet-50 and BERT-base, fixed seeds (built once into {MODELS}) ...")
    resnet, bert = build_resnet(MODELS), build_bert(MODELS)
    out = {"machine": {"cores": sizing.cores()}, "seconds": seconds, "runs": runs}
    out["resnet50"] = one_model(resnet, "resnet50", "image", images(), work / "resnet50", seconds, log, runs)
    save(out)
    if peers:
        out["resnet50 peers"] = with_peers(resnet, work / "peers", seconds, log)
        save(out)
    bodies = text_payloads(texts(bert / "tokenizer.json"))
    out["bert-base"] = one_model(bert, "bert", "text", bodies, work / "bert", seconds, log, runs)
    save(out)
    if peers:
        out["bert-base peers"] = with_peers(
            bert, work / "bert-peers", seconds, log, case=text_case, warmup=16, loaded=BERT_LOADED
        )
        save(out)
        out["footprint"] = {
            "resnet50": footprint(resnet, work / "footprint", log),
            "bert-base": footprint(bert, work / "footprint", log, case=text_case),
        }
        save(out)
    out["bert-base int8"] = int8_row(
        bert, "bert", bodies, work / "bert", seconds, out["bert-base"]["chosen"], log, runs
    )
    save(out)
    out["detector"] = detector_row(work / "detector", seconds, log, runs)
    return out


def detector_row(work: Path, seconds: float, log, runs: int) -> dict:
    """The ceiling (one image a pass: a detector's graph takes one), the server's own choice at c=1 and c=16."""
    export = detector.build(MODELS)
    bodies = detector.photos()
    rows = model_inputs(export, ModelCard.load(export), bodies, "image")
    chosen = chosen_settings(export)
    log(f"  detector: the server's own choice {chosen}")
    grid = []  # what batching gives a graph that takes one image a pass: only the queueing (docs/serving.md)
    for batch in sorted({1, chosen["max_batch"]}):
        settings = {**chosen, "max_batch": batch}
        lv = served_levels(export, "detector", "detect", bodies, work / "state", settings, seconds, levels=(16,))[0]
        grid.append({**settings, **lv})
    measured = in_turns(
        export,
        "detector",
        "detect",
        bodies,
        work,
        chosen=chosen,
        seconds=seconds,
        rows=rows,
        runs=runs,
        log=log,
        batches=(1,),
    )
    return {"model": "detector", "chosen": chosen, "grid": grid, "runs": measured}


def save(partial: dict) -> None:
    """What is measured so far, beside the models: half an hour of measuring is not lost to a later failure."""
    (MODELS / "partial-results.json").write_text(json.dumps(partial, indent=1))


def spread(values: list[float], form: str = "{:,.1f}") -> str:
    return f"{form.format(statistics.median(values))} [{form.format(min(values))}-{form.format(max(values))}]"


def targets(section: dict) -> list[tuple[str, float, str, bool]]:
    """(name, worst value over the runs, goal, met in every run)."""
    out = []
    for model in ("resnet50", "bert-base", "detector"):
        m = section.get(model)
        if not m:
            continue
        c16 = [
            next(x for x in r["levels"] if x["concurrency"] == 16)["throughput"]
            / r.get("ceiling_items_per_s", r["ceiling"]["best"]["items_per_s"])
            for r in m["runs"]
        ]
        c1 = [
            next(x for x in r["levels"] if x["concurrency"] == 1)["p50_ms"]
            / r.get("batch1_ms", r["ceiling"]["best_batch1_ms"])
            for r in m["runs"]
        ]
        out.append((f"{model}: OIP c=16 / in-process ceiling", min(c16), ">= 0.9", min(c16) >= 0.9))
        out.append((f"{model}: OIP c=1 p50 / in-process batch-1 latency", max(c1), "<= 1.1", max(c1) <= 1.1))
        if not m["grid"]:
            continue
        best = max(g["throughput"] for g in m["grid"])
        keys = ("workers", "threads", "max_batch", "pass_slots", "busy_threads")
        chosen = [g for g in m["grid"] if all(g.get(k) == m["chosen"].get(k) for k in keys)]
        mine = (
            statistics.median(next(x for x in r["levels"] if x["concurrency"] == 16)["throughput"] for r in m["runs"])
            if not chosen
            else chosen[0]["throughput"]
        )
        out.append((f"{model}: chosen setting c=16 / best of the grid", mine / best, ">= 0.9", mine / best >= 0.9))
    for model in ("resnet50", "bert-base"):
        p = section.get(f"{model} peers", {})
        ran = {k: v for k, v in p.items() if isinstance(v, dict) and "levels" in v}
        if "oip" in ran and len(ran) > 1:
            c16 = {k: next(lv for lv in v["levels"] if lv["concurrency"] == 16)["throughput"] for k, v in ran.items()}
            best = max((k for k in c16 if k != "oip"), key=c16.get)
            ratio = c16["oip"] / c16[best]
            out.append((f"{model}: OIP c=16 / best peer ({best})", ratio, ">= 1", ratio >= 1))
    return out


def table(section: dict) -> list[str]:
    lines = [f"Real-sized models ({section['runs']} runs, {section['seconds']:.0f} s levels; median [min-max])"]
    for model in ("resnet50", "bert-base", "bert-base int8", "detector"):
        m = section.get(model)
        if not m:
            continue
        top = [r["ceiling"]["best"]["items_per_s"] for r in m["runs"]]
        lat = [r["ceiling"]["best_batch1_ms"] for r in m["runs"]]
        best = m["runs"][0]["ceiling"]["best"]
        lines.append(
            f"  {model}: ceiling {spread(top)}/s ({best['sessions']} session(s) x {best['threads']} thread(s), batch "
            f"{best['batch']}), batch-1 latency {spread(lat, '{:.1f}')} ms"
        )
        for c in sorted({x["concurrency"] for r in m["runs"] for x in r["levels"]}):
            ls = [next(x for x in r["levels"] if x["concurrency"] == c) for r in m["runs"]]
            lines.append(
                f"    OIP c={c:<2} {spread([x['throughput'] for x in ls])} req/s, p50 "
                f"{spread([x['p50_ms'] for x in ls], '{:.1f}')} ms, errors {sum(sum(x['errors'].values()) for x in ls)}"
            )
        for k, r in enumerate(m["runs"], 1):
            if "rounds" not in r:
                continue
            turns = ", ".join(
                f"{t['c16'] / t['ceiling_items_per_s']:.2f}/{t['c1_p50_ms'] / t['batch1_ms']:.2f}" for t in r["rounds"]
            )
            steal = max(v for t in r["rounds"] for v in t["steal"].values())
            lines.append(
                f"    run {k}, in turns with the ceiling measured again: c=16/ceiling, c=1/batch-1 by turn {turns}; "
                f"CPU stolen at most {steal:.0%} of a phase"
            )
        if "chosen" in m:
            lines.append(f"    chosen by the server: {m['chosen']}")
            for g in m["grid"]:
                lines.append(
                    f"    grid: {g['workers']} worker(s) x {g['threads']} thread(s), "
                    f"{g.get('pass_slots', '-')} pass(es) at once ({g.get('busy_threads', g['threads'])} thread(s) "
                    f"each), batch {g['max_batch']}: "
                    f"c=16 {g['throughput']:,.1f} req/s"
                )
        for a in m.get("approximations", []):
            lines.append(f"    int8 proof: {json.dumps(a)[:200]}")
    for model in ("resnet50", "bert-base"):
        lines += peer_lines(model, section.get(f"{model} peers"))
    for model in ("resnet50", "bert-base"):
        lines += footprint_lines(model, section.get("footprint", {}).get(model))
    for name, value, goal, ok in targets(section):
        lines.append(f"  {'PASS' if ok else 'FAIL'} {name}: {value:.2f} (goal {goal})")
    return lines


def peer_lines(model: str, p: dict | None) -> list[str]:
    lines = []
    if p:
        lines.append(f"  {model} served (c=1 p50 ms; c=4, c=16 req/s; agreement with in-process ONNX Runtime):")
        for name, s in p.items():
            if not isinstance(s, dict) or "kind" not in s:
                continue
            if "levels" not in s:
                lines.append(f"    {name:<10} could not run: {s.get('error', '?')[:100]}")
                continue
            by_c = {lv["concurrency"]: lv for lv in s["levels"]}
            errors = sum(sum(lv["errors"].values()) for lv in s["levels"])
            lines.append(
                f"    {name:<10} c=1 {by_c[1]['latency_ms']['p50']:7.1f} ms  c=4 {by_c[4]['throughput']:6.1f}  c=16 "
                f"{by_c[16]['throughput']:6.1f}  agreement {min(lv['accuracy'] for lv in s['levels']):.3f}  "
                f"errors {errors}"
            )
    return lines
