"""`make bench`: in-process inference, serving and training against their baselines; JSON + a table.

Absolute numbers drift between machines; the ratios, measured side by side in one run, are what count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch

from bench import inference, serving, training
from torchship.runtime.card import FORMAT_BY_NAME
from torchship.serve.archive import ModelConfig
from torchship.train.presets import DEFAULT_PRESET

RESULTS = Path(__file__).with_name("results.json")
PARTS = ("inference", "resnet18", "serving", "formats", "workers", "training", "ddp")


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": str(torch.__version__),
            "onnxruntime": onnxruntime.__version__, "cuda": torch.cuda.get_device_name() if torch.cuda.is_available()
            else None}  # fmt: skip


def ensure_export(run_dir: Path, export_dir: Path, data_dir: Path) -> None:
    """Benchmark the default model as `make train export` leaves it, building it first if needed."""
    if not (run_dir / "best.pt").is_file():
        from torchship.train.fit import train
        from torchship.train.presets import get_preset

        train(get_preset(DEFAULT_PRESET), run_dir, data_dir, quiet=True)
    if not all((export_dir / FORMAT_BY_NAME[f].file).is_file() for f in FORMAT_BY_NAME):
        from torchship.export.formats import Options, export_checkpoint

        print("exporting every format (the pt2 compiles for a minute or two) ...", flush=True)
        export_checkpoint(run_dir / "best.pt", export_dir, tuple(FORMAT_BY_NAME), options=Options(data_dir))


def resnet18_export(work: Path) -> Path:
    """torchvision's ResNet-18 (random weights: speed does not depend on them) through `export --model`'s path."""
    import torchvision

    from torchship.export.formats import export_model, stamp
    from torchship.export.user_model import user_model

    weights = work / "resnet18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    model, card = user_model("torchvision.models:resnet18", weights, input_shape=(3, 224, 224),
                             mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))  # fmt: skip
    return export_model(model, stamp(card, weights), work / "resnet18").directory


def fastest_two(inf: dict) -> list[str]:
    """The two exported formats with the lowest in-process time per image at batch 1."""
    rows = sorted((x["us_per_image"], x["backend"]) for x in inf["rows"] if x["batch"] == 1 and x["backend"] != "eager")
    return [b for _, b in rows[:2]]


def level(section: dict, c: int) -> dict:
    return next(lv for lv in section["levels"] if lv["concurrency"] == c)


def same_digits_accuracy(serving: dict) -> tuple[float, float, int]:
    """Accuracy of each setup over the digits both answered (levels send different numbers of requests)."""

    def answers(name):
        merged: dict[int, int] = {}
        for lv in serving[name]["levels"]:
            for i, a in enumerate(lv.get("answers", [])):
                if a >= 0:
                    merged[i] = min(merged.get(i, 1), a)  # any wrong answer for a digit counts as wrong
        return merged

    ours, base = answers("ours"), answers("baseline")
    both = sorted(set(ours) & set(base))
    if not both:
        return float("nan"), float("nan"), 0
    return sum(ours[i] for i in both) / len(both), sum(base[i] for i in both) / len(both), len(both)


def targets(r: dict) -> list[dict]:
    out = []

    def check(name, value, goal, ok):
        out.append({"target": name, "value": value, "goal": goal, "met": bool(ok)})

    if "serving" in r:
        b16, o16 = level(r["serving"]["baseline"], 16), level(r["serving"]["ours"], 16)
        b1, o1 = level(r["serving"]["baseline"], 1), level(r["serving"]["ours"], 1)
        ratio = o16["throughput"] / b16["throughput"]
        check("serving throughput c=16, ours/baseline", round(ratio, 2), ">= 10", ratio >= 10)
        check("serving p99 c=16, ours vs baseline (ms)", [round(o16["latency_ms"]["p99"], 2),
              round(b16["latency_ms"]["p99"], 2)], "ours <= baseline", o16["latency_ms"]["p99"] <=
              b16["latency_ms"]["p99"])  # fmt: skip
        errors = sum(sum(lv["errors"].values()) for lv in r["serving"]["ours"]["levels"])
        check("serving errors (ours, all levels)", errors, "0", errors == 0)
        acc, bacc, n = same_digits_accuracy(r["serving"])
        check(f"serving accuracy, same {n} digits, ours vs base", [round(acc, 4), round(bacc, 4)],
              "ours >= baseline", acc >= bacc)  # fmt: skip
        p50 = o1["latency_ms"]["p50"] / b1["latency_ms"]["p50"]
        check("serving p50 c=1, ours/baseline", round(p50, 2), "<= 0.5", p50 <= 0.5)
    if "workers" in r:
        two = r["workers"]["2 workers"]["disruption"]
        check("2 workers: no answer for at most (s)", round(two["longest_gap_s"], 2), "<= 2", two["longest_gap_s"] <= 2)
        check("2 workers: failed requests sent after the kill", two["failed_sent_after_kill"], "0",
              two["failed_sent_after_kill"] == 0)  # fmt: skip
    if "inference" in r:
        rows = {(x["backend"], x["batch"]): x["us_per_image"] for x in r["inference"]["rows"]}
        onnx = "onnx" if ("onnx", 1) in rows else "onnxruntime"  # results written before the formats issue
        ort1 = next(x for x in r["inference"]["rows"] if x["backend"] == onnx and x["batch"] == 1)
        speed = ort1.get("eager_over_this", rows["eager", 1] / rows[onnx, 1])  # median of paired rounds
        check("in-process batch 1, eager/onnx", round(speed, 2), ">= 3", speed >= 3)
        floor = rows[onnx, 64] / r["inference"]["floor_us_per_image"]
        check("in-process batch 64, onnx/FLOP floor", round(floor, 2), "<= 1.5", floor <= 1.5)
    if "training" in r:
        t = r["training"]
        check("training epoch time, ours/tutorial loop", round(t["ratio"], 2), "<= 0.7", t["ratio"] <= 0.7)
        gap = t["accuracy_gap_points"]
        check("training test accuracy gap (points)", round(gap, 2), "within +-0.5", abs(gap) <= 0.5)
    return out


def rounds_line(rounds: dict) -> str:
    pair = rounds.get("pair", ["ours", "baseline"])
    return (f"c=1 measured in {len(rounds['p50_ratios']) * 2} alternating rounds of {rounds['seconds_each']:g} s; "
            f"per-round p50 ratio {pair[0]}/{pair[1]}: median {rounds['p50_ratio_median']:.2f}, range "
            f"{min(rounds['p50_ratios']):.2f}-{max(rounds['p50_ratios']):.2f}")  # fmt: skip


def inference_table(inf: dict) -> list[str]:
    sizes = inf.get("batch_sizes", [1, 64])
    lines = [f"In-process inference, {inf.get('model', 'mnist-convnet')} {inf.get('input_shape', '')} (us per image; "
             f"FLOP floor {inf['floor_us_per_image']:.1f} us = {inf['flops_per_image'] / 1e6:.2f} MFLOP / "
             f"{inf['matmul_gflops']:.0f} GFLOP/s matmul)",
             f"{'backend':<18}" + "".join(f"{'batch ' + str(b):>10}" for b in sizes)]  # fmt: skip
    rows = {(x["backend"], x["batch"]): x["us_per_image"] for x in inf["rows"]}
    for b in dict.fromkeys(x["backend"] for x in inf["rows"]):
        lines.append(f"{b:<18}" + "".join(f"{rows.get((b, s), float('nan')):>10.1f}" for s in sizes))
    return lines


def table(r: dict) -> str:
    lines = [f"machine: {r['machine']['cpu']}, {r['machine']['cores']} cores; torch {r['machine']['torch']}, "
             f"onnxruntime {r['machine']['onnxruntime']}"]  # fmt: skip
    for key in ("inference", "resnet18"):
        if key in r:
            lines += ["", *inference_table(r[key])]
    if "serving" in r:
        lines += [
            "",
            "Serving (same load test, 127.0.0.1: stock TorchServe, our TorchServe, our KServe runtime over v2)",
            f"{'setup':<9} {'conc':>4} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} {'accuracy':>8}",
        ]
        for name in (k for k in ("baseline", "ours", "kserve") if k in r["serving"]):
            for lv in r["serving"][name]["levels"]:
                lines.append(
                    f"{name:<9} {lv['concurrency']:>4} {lv['throughput']:>8.1f} {lv['latency_ms']['p50']:>7.2f} "
                    f"{lv['latency_ms']['p99']:>7.2f} {sum(lv['errors'].values()):>6} {lv['accuracy']:>8.4f}"
                )
        if r["serving"].get("c1_rounds"):
            lines.append(rounds_line(r["serving"]["c1_rounds"]))
        if "kserve" in r["serving"]:
            k1, o1 = level(r["serving"]["kserve"], 1), level(r["serving"]["ours"], 1)
            k16, o16 = level(r["serving"]["kserve"], 16), level(r["serving"]["ours"], 16)
            vs = r["serving"]["c1_rounds"]["p50_ratio_median_vs_first"]
            lines.append(f"KServe runtime vs our TorchServe: c=1 p50 {k1['latency_ms']['p50']:.2f} vs "
                         f"{o1['latency_ms']['p50']:.2f} ms (per-round median vs baseline {vs['kserve']:.2f} vs "
                         f"{vs['ours']:.2f}); c=16 {k16['throughput']:.0f} vs {o16['throughput']:.0f} req/s, p99 "
                         f"{k16['latency_ms']['p99']:.1f} vs {o16['latency_ms']['p99']:.1f} ms")  # fmt: skip
    if "formats" in r:
        f = r["formats"]
        lines += ["", "Serving the two fastest formats (our handler, same defaults, both up, same load test)",
                  f"{'backend':<10} {'c=1 p50 ms':>10} {'c=1 p99 ms':>10} {'c=16 req/s':>10} {'c=16 p99':>8} "
                  f"{'errors':>6} {'accuracy':>8}"]  # fmt: skip
        for name in (k for k in f if k != "c1_rounds"):
            c1, c16 = level(f[name], 1), level(f[name], 16)
            errors = sum(sum(lv["errors"].values()) for lv in f[name]["levels"])
            lines.append(f"{name:<10} {c1['latency_ms']['p50']:>10.2f} {c1['latency_ms']['p99']:>10.2f} "
                         f"{c16['throughput']:>10.1f} {c16['latency_ms']['p99']:>8.2f} {errors:>6} "
                         f"{c16['accuracy']:>8.4f}")  # fmt: skip
        lines.append(rounds_line(f["c1_rounds"]))
    if "workers" in r:
        w = r["workers"]
        lines += ["", "Workers (our handler, both up, same load test; then a READY worker SIGKILLed under 64 clients)",
                  f"{'setup':<10} {'c=1 p50 ms':>10} {'c=16 req/s':>10} {'c=16 p99':>8} {'failed':>6} "
                  f"{'sent after':>10} {'no answer':>9}"]  # fmt: skip
        for name in (k for k in w if k != "c1_rounds"):
            c1, c16 = level(w[name], 1), level(w[name], 16)
            d = w[name].get("disruption", {})
            lines.append(f"{name:<10} {c1['latency_ms']['p50']:>10.2f} {c16['throughput']:>10.1f} "
                         f"{c16['latency_ms']['p99']:>8.2f} {sum(d.get('failed', {}).values()):>6} "
                         f"{d.get('failed_sent_after_kill', 0):>10} {d.get('longest_gap_s', 0):>8.2f}s")  # fmt: skip
        lines.append(rounds_line(w["c1_rounds"]))
    if "training" in r:
        t = r["training"]
        lines += [
            "",
            f"Training (mnist-convnet, {t['epochs']} epochs, seeds {t['seeds']}: median epoch s, mean test accuracy)",
            f"ours      {t['ours_epoch_s']:.2f} s  {t['ours_accuracy']:.4f}",
            f"tutorial  {t['tutorial_epoch_s']:.2f} s  {t['tutorial_accuracy']:.4f}",
        ]
    if "ddp" in r:
        d = r["ddp"]
        lines += ["", f"Training {d['preset']} with DistributedDataParallel on this machine (gloo, CPU; median epoch "
                      f"after the first of {d['epochs']})", f"{'processes':>9} {'epoch s':>8} {'images/s':>9} "
                      f"{'test acc':>8}"]  # fmt: skip
        for row in d["rows"]:
            lines.append(f"{row['processes']:>9} {row['epoch_s']:>8.2f} {row['images_per_second']:>9.0f} "
                         f"{row['test_accuracy']:>8.4f}")  # fmt: skip
    lines += ["", f"{'target':<48} {'value':>18}  {'goal':<24} met"]
    for t in r["targets"]:
        lines.append(f"{t['target']:<48} {json.dumps(t['value']):>18}  {t['goal']:<24} {'yes' if t['met'] else 'NO'}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", choices=PARTS, action="append")
    ap.add_argument("--duration", type=float, default=10, help="seconds per load level")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--table", action="store_true", help="print the table of an existing results file and exit")
    ap.add_argument("--workers", type=int, help="try another serving config than `make serve`'s defaults")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--max-batch-delay", type=int)
    args = ap.parse_args()
    if args.table:  # re-render (and re-judge) an earlier run
        r = json.loads(args.out.read_text())
        r["targets"] = targets(r)
        print(table(r))
        return
    run_dir, export_dir, data_dir = Path(f"runs/{DEFAULT_PRESET}"), Path(f"exports/{DEFAULT_PRESET}"), Path("data")
    parts = args.only or list(PARTS)
    if {"inference", "serving", "formats", "workers"} & set(parts):
        ensure_export(run_dir, export_dir, data_dir)
    r: dict = {"machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with tempfile.TemporaryDirectory(prefix="torchship-bench-") as tmp:
        if "inference" in parts:
            print("in-process inference ...", flush=True)
            r["inference"] = inference.run(export_dir)
        if "resnet18" in parts:
            print("in-process inference, ResNet-18 ...", flush=True)
            r["resnet18"] = inference.run(resnet18_export(Path(tmp)), batch_sizes=(1, 16), rounds=3, min_seconds=1)
        if "serving" in parts:
            print("serving: baseline and ours, c=1 in alternating rounds ...", flush=True)
            d = ModelConfig()
            workers = args.workers or d.minWorkers
            ours = ModelConfig(minWorkers=workers, maxWorkers=workers, batchSize=args.batch_size or d.batchSize,
                               maxBatchDelay=args.max_batch_delay or d.maxBatchDelay)  # fmt: skip
            r["serving"] = serving.run(export_dir, Path(tmp), args.duration, ours)
        if "formats" in parts:
            inf = r.get("inference") or inference.run(export_dir, rounds=3)
            fastest = fastest_two(inf)
            print(f"serving the two fastest formats in-process at batch 1: {', '.join(fastest)} ...", flush=True)
            setups = {b: (b, ModelConfig(), None) for b in fastest}
            r["formats"] = serving.compare(export_dir, Path(tmp), setups, args.duration, rounds=6, concurrency=(16,))
        if "workers" in parts:
            print("serving: 1 worker vs 2, c=1 in alternating rounds, then a worker killed under load ...", flush=True)
            r["workers"] = serving.workers(export_dir, Path(tmp), args.duration)
        if "ddp" in parts:
            print("training with 1 and 2 processes (torchrun, gloo) ...", flush=True)
            r["ddp"] = training.processes(data_dir, Path(tmp))
        if "training" in parts:
            print("training: ours, then the tutorial loop ...", flush=True)
            r["training"] = training.run(data_dir, Path(tmp), args.epochs, "cpu")
    r["targets"] = targets(r)
    args.out.write_text(json.dumps(r, indent=2))
    print(table(r))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
