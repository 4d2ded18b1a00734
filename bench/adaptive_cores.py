"""Issue 36, measured before building: can one layout of a heavy model's workers meet both targets, a lone request on
every core (c=1 <= 1.1x in-process) and the cores split between workers under load (c=16 >= 0.9 of the ceiling)?
Lever 59 found that neither fixed layout does: workers taking turns with every core lose 4-10 % under load; workers
of one thread each answer a lone request at half speed.

The candidate, "adaptive": each worker holds two ONNX Runtime sessions of the model, one on every core (wide) and one
on one core (narrow), and the server has one slot a core (an flock each, as handlers/oip/slots.py). A pass takes every
slot if all are free and runs wide; else it takes one slot (waiting for it if need be) and runs narrow. Alone, a pass
runs wide; under load the workers settle on one core each.

In-process, without the server: WORKERS processes each run passes of BATCH images back to back (saturated), or one
process runs them one at a time (lone), for each layout: turns (wide, one pass at a time), narrow (one thread each, no
slots), adaptive. `.venv/bin/python -m bench.adaptive_cores [MODEL_DIR] [SECONDS]` (default bench/models/resnet50,
made by `python -m bench.run --only heavy`)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LAYOUTS = tuple(os.environ.get("LAYOUTS", "turns,narrow,adaptive").split(","))
WORKERS, BATCH = 2, 1


def sessions(model: Path, layout: str):
    import onnxruntime as ort

    from torchship.handlers.model.runners import session_options

    cores = os.cpu_count() or 1
    make = lambda n: ort.InferenceSession(str(model), session_options(n), providers=["CPUExecutionProvider"])  # noqa: E731
    wide = make(cores) if layout != "narrow" else None
    narrow = make(1) if layout != "turns" else None
    return wide, narrow


def slots(lock_dir: str, layout: str):
    """The server's pass slots (handlers/oip/slots.py) as each layout uses them: one for all (turns), one a core
    (adaptive), none (narrow)."""
    from torchship.handlers.oip.slots import NONE, Slots

    count = {"turns": 1, "adaptive": os.cpu_count() or 1}.get(layout, 0)
    return Slots(f"{lock_dir}/slot", count) if count else NONE


def worker(model: Path, layout: str, lock_dir: str, start: float, seconds: float, queue) -> None:
    wide, narrow = sessions(model, layout)
    session = wide or narrow
    name = session.get_inputs()[0].name
    shape = [BATCH, *session.get_inputs()[0].shape[1:]]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    shared = slots(lock_dir, layout)
    for s in (wide, narrow):
        if s is not None:
            s.run(None, {name: x})  # warm
    while time.time() < start:
        time.sleep(0.001)
    passes, kinds, times = 0, {"wide": 0, "narrow": 0}, []
    while time.time() < start + seconds:
        with shared.taken(wide=layout == "adaptive") as held:
            kind = "narrow" if layout == "narrow" or (layout == "adaptive" and held < shared.count) else "wide"
            t = time.perf_counter()
            (wide if kind == "wide" else narrow).run(None, {name: x})
            times.append(time.perf_counter() - t)
        passes, kinds[kind] = passes + 1, kinds[kind] + 1
    queue.put({"passes": passes, "kinds": kinds, "p50_ms": float(np.median(times) * 1000)})


def measure(model: Path, layout: str, workers: int, seconds: float) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as locks:
        start = time.time() + 8  # every process's sessions built and warm first
        procs = [ctx.Process(target=worker, args=(model, layout, locks, start, seconds, queue)) for _ in range(workers)]
        for p in procs:
            p.start()
        results = [queue.get() for _ in procs]
        for p in procs:
            p.join()
    images = sum(r["passes"] for r in results) * BATCH
    kinds = {k: sum(r["kinds"][k] for r in results) for k in ("wide", "narrow")}
    return {"items_per_s": images / seconds, "p50_ms": float(np.median([r["p50_ms"] for r in results])), **kinds}


def main(model_dir: str = "bench/models/resnet50", seconds: float = 8.0, rounds: int = 3) -> dict:
    model = Path(model_dir) / "model.onnx"
    out: dict = {"model": str(model), "seconds": seconds, "cpu": os.cpu_count(), "rounds": []}
    for r in range(rounds):  # alternating, as this machine's speed drifts
        row = {}
        for layout in LAYOUTS:
            row[f"{layout} saturated"] = measure(model, layout, WORKERS, seconds)
            row[f"{layout} lone"] = measure(model, layout, 1, seconds)
            print(r, layout, row[f"{layout} saturated"], row[f"{layout} lone"], flush=True)
        out["rounds"].append(row)
    return out


def served(seconds: float = 8.0, rounds: int = 3, work: str = "/tmp/adaptive-served") -> dict:
    """Both layouts served by the OIP server, side by side, for ResNet-50 and BERT-base (batches up to 8, 2 ms delay),
    at c=1, 4 and 16 each round, beside the in-process ceiling: `python -m bench.adaptive_cores --served`."""
    from bench.heavy import ceiling, layouts, model_inputs, served_levels
    from bench.real_models import MODELS, images, text_payloads, texts
    from torchship.handlers.card import ModelCard

    n = os.cpu_count() or 1
    models = {"resnet50": ("image", images()), "bert-base": ("text", None)}
    out: dict = {"seconds": seconds, "cpu": n, "rounds": []}
    for r in range(rounds):
        row = {}
        for model, (kind, bodies) in models.items():
            export = MODELS / model
            bodies = bodies or text_payloads(texts(export / "tokenizer.json"))
            rows = model_inputs(export, ModelCard.load(export), bodies, kind)
            row[f"{model} ceiling"] = ceiling(export / "model.onnx", rows, seconds=min(seconds, 4))["best"]
            for layout in ("turns", "adaptive"):
                workers, threads, slots, busy = layouts(n)[layout]
                given = {"workers": workers, "threads": threads, "pass_slots": slots, "busy_threads": busy}
                given.update(max_batch=8, max_batch_delay_ms=2)
                levels = served_levels(export, model, kind, bodies, Path(work) / "state", given, seconds)
                row[f"{model} {layout}"] = levels
                print(
                    r,
                    model,
                    layout,
                    [(lv["concurrency"], round(lv["throughput"], 2), round(lv["p50_ms"], 1)) for lv in levels],
                    flush=True,
                )
        out["rounds"].append(row)
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["--served"]:
        result = served(*(float(a) for a in sys.argv[2:3]))
    else:
        result = main(*(sys.argv[1:2] or []), *(float(a) for a in sys.argv[2:3]))
    print(json.dumps(result, indent=1))
