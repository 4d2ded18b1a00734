"""`make bench`: in-process inference, serving and training against their baselines; JSON + a table.

Absolute numbers drift between machines; the ratios, measured side by side in one run, are what count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch

from bench import ab, heavy, inference, lifecycle, serving, text, training, triton_tools
from bench.report import range_table, table, targets
from torchship.handlers.formats import FORMAT_BY_NAME
from torchship.serve.archive import ModelConfig
from torchship.train.presets import DEFAULT_PRESET

RESULTS = Path(__file__).with_name("results.json")
PARTS = (
    "inference",
    "resnet18",
    "serving",
    "triton",
    "text",
    "heavy",
    "lifecycle",
    "formats",
    "workers",
    "training",
    "ddp",
)


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "onnxruntime": onnxruntime.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def ensure_export(run_dir: Path, export_dir: Path, data_dir: Path, formats: tuple[str, ...] = tuple(FORMAT_BY_NAME)):
    """Benchmark the default model as `make train export` leaves it, building it (in FORMATS) first if needed."""
    if not (run_dir / "best.pt").is_file():
        from torchship.train.fit import train
        from torchship.train.presets import get_preset

        train(get_preset(DEFAULT_PRESET), run_dir, data_dir, quiet=True)
    if not all((export_dir / FORMAT_BY_NAME[f].file).is_file() for f in formats):
        from torchship.export.formats import Options, export_checkpoint

        print(f"exporting {', '.join(formats)} (a pt2 compiles for a minute or two) ...", flush=True)
        export_checkpoint(run_dir / "best.pt", export_dir, formats, options=Options(data_dir))


def resnet18_export(work: Path) -> Path:
    """torchvision's ResNet-18 (random weights: speed does not depend on them) through `export --model`'s path."""
    import torchvision

    from torchship.export.formats import export_model, stamp
    from torchship.export.user_model import user_model

    weights = work / "resnet18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    model, card = user_model(
        "torchvision.models:resnet18",
        weights,
        input_shape=(3, 224, 224),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    )
    return export_model(model, stamp(card, weights), work / "resnet18").directory


def fastest_two(inf: dict) -> list[str]:
    """The two exported formats with the lowest in-process time per image at batch 1."""
    rows = sorted((x["us_per_image"], x["backend"]) for x in inf["rows"] if x["batch"] == 1 and x["backend"] != "eager")
    return [b for _, b in rows[:2]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--only", choices=(*PARTS, "ab"), action="extend", nargs="+", help="these parts only (one or more, or repeated)"
    )
    ap.add_argument(
        "--baseline",
        metavar="REF",
        help="also run the OIP server at git commit REF against the working tree's, side by side (bench/ab.py)",
    )
    ap.add_argument("--duration", type=float, default=10, help="seconds per load level")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument(
        "--runs", type=int, default=1, help="measure everything this many times, then print each target's range"
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--table", action="store_true", help="print the table of an existing results file and exit")
    ap.add_argument(
        "--range",
        nargs="+",
        type=Path,
        metavar="RESULTS",
        help="print the ranges over several results files of one machine and exit",
    )
    ap.add_argument("--workers", type=int, help="try another serving config than `make serve`'s defaults")
    ap.add_argument("--no-peers", action="store_true", help="triton: our server only, without setting up PyTriton")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--max-batch-delay-ms", type=int)
    args = ap.parse_args()
    # SIGTERM unwinds like Ctrl-C, so every server this run started is stopped on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.range:
        print(range_table([json.loads(f.read_text()) for f in args.range]))
        return
    if args.table:  # re-render (and re-judge) an earlier run
        r = json.loads(args.out.read_text())
        r["targets"] = targets(r)
        print(table(r))
        return
    run_dir, export_dir, data_dir = Path(f"runs/{DEFAULT_PRESET}"), Path(f"exports/{DEFAULT_PRESET}"), Path("data")
    parts = args.only or list(PARTS)
    if args.baseline and "ab" not in parts:
        parts.append("ab")
    if "ab" in parts and not args.baseline:
        ap.error("the ab part compares with a commit: give --baseline REF")
    if {"inference", "serving", "triton", "lifecycle", "formats", "workers"} & set(parts):
        ensure_export(run_dir, export_dir, data_dir)
    elif "ab" in parts:  # the servers run the ONNX model only: no compiler needed
        ensure_export(run_dir, export_dir, data_dir, ("ts", "onnx"))

    def one_run() -> dict:
        """Every part asked for, once, on this machine as it is now."""
        r: dict = {"machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with tempfile.TemporaryDirectory(prefix="torchship-bench-") as tmp:
            if "inference" in parts:
                print("in-process inference ...", flush=True)
                r["inference"] = inference.run(export_dir)
            if "resnet18" in parts:
                print("in-process inference, ResNet-18 ...", flush=True)
                r["resnet18"] = inference.run(resnet18_export(Path(tmp)), batch_sizes=(1, 16), rounds=3, min_seconds=1)
            if "serving" in parts:
                print("serving: stock and our TorchServe, our OIP server, the peers, the ceiling ...", flush=True)
                d = ModelConfig()
                workers = args.workers or d.minWorkers
                ours = ModelConfig(
                    minWorkers=workers,
                    maxWorkers=workers,
                    batchSize=args.batch_size or d.batchSize,
                    maxBatchDelay=args.max_batch_delay_ms or d.maxBatchDelay,
                )
                r["serving"] = serving.run(export_dir, Path(tmp), args.duration, ours)
            if "triton" in parts:
                print("Triton's perf_analyzer against our OIP server and PyTriton ...", flush=True)
                r["triton"] = triton_tools.run(
                    export_dir, Path(tmp) / "triton", min(args.duration, 5), peers=not args.no_peers
                )
            if "text" in parts:
                print(
                    "a sentence-embedding model: passes by rows and by tokens, and the tokenizer's share ...",
                    flush=True,
                )
                r["text"] = text.run(Path(tmp) / "text", min(args.duration, 5))
            if "heavy" in parts:
                print("real-sized models: ResNet-50 and BERT-base against their in-process ceiling ...", flush=True)
                r["heavy"] = heavy.run(Path(tmp) / "heavy", args.duration, runs=heavy.RUNS if args.runs == 1 else 1)
            if "lifecycle" in parts:
                print("a version swapped in under 64 clients; tracing off and on ...", flush=True)
                r["lifecycle"] = lifecycle.run(export_dir, Path(tmp) / "lifecycle", data_dir, args.duration)
            if "formats" in parts:
                inf = r.get("inference") or inference.run(export_dir, rounds=3)
                fastest = fastest_two(inf)
                print(f"serving the two fastest formats in-process at batch 1: {', '.join(fastest)} ...", flush=True)
                setups = {b: serving.Setup("torchserve", b, ModelConfig()) for b in fastest}
                r["formats"] = serving.compare(
                    export_dir, Path(tmp), setups, args.duration, rounds=6, concurrency=(16,)
                )
            if "workers" in parts:
                print(
                    "serving: 1 worker vs 2, c=1 in alternating rounds, then a worker killed under load ...", flush=True
                )
                r["workers"] = serving.workers(export_dir, Path(tmp), args.duration)
            if "ab" in parts:
                print(f"the OIP server at {args.baseline} against the working tree's, side by side ...", flush=True)
                r["ab"] = ab.run(export_dir, Path(tmp) / "ab", args.baseline, seconds=min(args.duration, 5))
            if "ddp" in parts:
                print("training with 1 and 2 processes (torchrun, gloo) ...", flush=True)
                r["ddp"] = training.processes(data_dir, Path(tmp))
            if "training" in parts:
                print("training: ours, then the tutorial loop ...", flush=True)
                r["training"] = training.run(data_dir, Path(tmp), args.epochs, "cpu")
        r["targets"] = targets(r)
        return r

    if args.runs == 1:
        r = one_run()
        args.out.write_text(json.dumps(r, indent=2))
        print(table(r))
        print(f"wrote {args.out}")
        return
    runs = []
    for k in range(1, args.runs + 1):
        print(f"run {k} of {args.runs} ...", flush=True)
        runs.append(one_run())
        path = args.out.with_name(f"{args.out.stem}-{k}{args.out.suffix}")
        path.write_text(json.dumps(runs[-1], indent=2))
        print(table(runs[-1]))
        print(f"wrote {path}")
    print(range_table(runs))


if __name__ == "__main__":
    main()
