"""`make gpu-check`: what has never run on CUDA here, run where a GPU is: every preset for a few epochs with and
without bf16 autocast, a resume, an export of a CUDA checkpoint with its proof, DistributedDataParallel over NCCL on
the GPUs present, and a table (seconds per epoch, images/s, test accuracy, time to 97% on the embedded digits).

Runs from a bare checkout with no install and no network: a CUDA PyTorch, torchvision, onnx, onnxruntime, click,
tqdm, matplotlib and Pillow are all it needs (`make gpu-check PYTHON=python3`). Without CUDA it says so in one line
and exits 0. `--device cpu` runs the same checks on a CPU, to try the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 3
TARGET_ACCURACY = 0.97


def importable() -> str | None:
    """Make `torchship.*` importable from the checkout, as pyproject.toml's package-dir maps the folders; returns the
    folder to put on PYTHONPATH for child processes (None when torchship is installed)."""
    try:
        import torchship.train  # noqa: F401

        return None
    except ImportError:  # the checkout's torchship/ folder was found, without the folders mapped under it
        for name in [m for m in sys.modules if m == "torchship" or m.startswith("torchship.")]:
            del sys.modules[name]
    text = (ROOT / "pyproject.toml").read_text()
    block = text.split("[tool.setuptools.package-dir]", 1)[1].split("\n[", 1)[0]
    mapping = dict(re.findall(r'^"?([\w.]+)"?\s*=\s*"([^"]+)"', block, re.M))
    layout = Path(tempfile.mkdtemp(prefix="torchship-layout-"))
    top = layout / "torchship"
    top.mkdir()
    for f in (ROOT / mapping.pop("torchship")).iterdir():
        (top / f.name).symlink_to(f)
    for name, folder in mapping.items():
        (layout / name.replace(".", "/")).symlink_to(ROOT / folder)
    sys.path.insert(0, str(layout))
    return str(layout)


def row(name: str, metrics: dict, seconds: float) -> dict:
    history = metrics["history"]
    later = history[1:] or history  # the first epoch pays for CUDA's start-up
    per_epoch = sorted(h["seconds"] for h in later)[len(later) // 2]
    return {
        "run": name,
        "epochs": len(history),
        "epoch_s": round(per_epoch, 3),
        "per_second": round(sorted(h["images_per_second"] for h in later)[len(later) // 2]),
        "test_accuracy": metrics.get("test_accuracy"),
        "test_loss": round(metrics["test_loss"], 5),
        "wall_s": round(seconds, 1),
    }


def train_presets(device: str, work: Path, data_dir: Path, epochs: int) -> list[dict]:
    from torchship.train.fit import train
    from torchship.train.presets import PRESETS, get_preset

    rows = []
    for name in PRESETS:
        preset = get_preset(name, epochs=epochs if name != "linreg" else None)
        if preset.dataset == "fashion-mnist":  # no network here: the embedded digits, with the preset's own model
            preset = replace(preset, dataset="mnist-5k")
        for amp in (False, True):
            t = time.perf_counter()
            metrics = train(
                preset, work / f"{name}-{'bf16' if amp else 'fp32'}", data_dir, device=device, amp=amp, quiet=True
            )
            rows.append(row(f"{name}{' bf16' if amp else ''}", metrics, time.perf_counter() - t))
            print(f"  {rows[-1]}", flush=True)
    return rows


def resume_and_export(device: str, work: Path, data_dir: Path) -> dict:
    """Two epochs, then --resume to three, on the GPU; then export the CUDA checkpoint and prove it."""
    from torchship.export.formats import Options, export_checkpoint
    from torchship.export.proof.verify import verify
    from torchship.train import checkpoint
    from torchship.train.fit import train
    from torchship.train.presets import get_preset

    out = work / "resume"
    train(get_preset("mnist-convnet", epochs=2), out, data_dir, device=device, quiet=True)
    train(get_preset("mnist-convnet", epochs=3), out, data_dir, device=device, resume=True, quiet=True)
    resumed = checkpoint.load(out / "last.pt").epoch
    exported = export_checkpoint(out / "best.pt", work / "export", ("ts", "onnx"), options=Options(data_dir))
    report = verify(exported.directory, data_dir=data_dir)
    return {
        "resumed_to_epoch": resumed,
        "export_proof_passed": report.passed,
        "proof_max_abs": max(c.max_abs for c in report.checks),
    }


def time_to_target(device: str, work: Path, data_dir: Path) -> dict:
    """The default preset until its validation accuracy first reaches 97%: seconds of training, and the epoch."""
    from torchship.train.fit import train
    from torchship.train.presets import get_preset

    t = time.perf_counter()
    metrics = train(get_preset("mnist-convnet"), work / "to-target", data_dir, device=device, quiet=True)
    total = time.perf_counter() - t
    elapsed = 0.0
    for h in metrics["history"]:
        elapsed += h["seconds"]
        if h["val_accuracy"] >= TARGET_ACCURACY:
            return {
                "epoch": h["epoch"],
                "training_s": round(elapsed, 2),
                "test_accuracy": metrics["test_accuracy"],
                "run_s": round(total, 1),
            }
    return {"epoch": None, "training_s": None, "test_accuracy": metrics["test_accuracy"], "run_s": round(total, 1)}


def ddp(device: str, work: Path, data_dir: Path, layout: str | None) -> dict:
    """torchrun with one process per GPU (NCCL), through the same command users run."""
    import torch

    n = max(1, torch.cuda.device_count()) if device == "cuda" else 2
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (layout, str(ROOT)) if p)}
    cmd = [
        sys.executable,
        "-m",
        "torchship.cli",
        "train",
        "--preset",
        "mnist-mlp",
        "--epochs",
        "2",
        "--quiet",
        "--data-dir",
        str(data_dir),
        "--out",
        str(work / "ddp"),
        "--nproc-per-node",
        str(n),
    ]
    if device == "cuda":
        cmd += ["--device", "auto"]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    seconds = time.perf_counter() - t
    if r.returncode != 0:
        return {"processes": n, "ok": False, "error": (r.stderr.strip().splitlines() or ["?"])[-1][:300]}
    metrics = json.loads((work / "ddp" / "metrics.json").read_text())
    return {
        "processes": n,
        "backend": "nccl" if device == "cuda" else "gloo",
        "ok": True,
        "test_accuracy": metrics["test_accuracy"],
        "wall_s": round(seconds, 1),
    }


def table(r: dict) -> str:
    lines = [
        f"GPU check: {r['device_name']} x {r['devices']}, torch {r['torch']}, {EPOCHS} epochs per preset "
        "(linreg: its 1,000), embedded mnist-5k",
        f"{'run':<24} {'epoch s':>8} {'rows or img/s':>13} {'test acc':>8} {'test loss':>10}",
    ]
    for x in r["presets"]:
        acc = f"{x['test_accuracy']:.4f}" if x["test_accuracy"] is not None else "n/a"
        lines.append(f"{x['run']:<24} {x['epoch_s']:>8.3f} {x['per_second']:>13} {acc:>8} {x['test_loss']:>10.5f}")
    t = r["to_target"]
    lines.append(
        f"time to {TARGET_ACCURACY:.0%} validation accuracy (mnist-convnet): "
        + (f"{t['training_s']} s of training, epoch {t['epoch']}" if t["epoch"] else "not reached")
        + f"; test accuracy {t['test_accuracy']:.4f}"
    )
    e = r["resume_export"]
    lines.append(
        f"resume: 2 epochs then --resume to {e['resumed_to_epoch']}; export of the CUDA checkpoint: proof "
        f"{'passed' if e['export_proof_passed'] else 'FAILED'} (max abs error {e['proof_max_abs']:.2e})"
    )
    d = r["ddp"]
    lines.append(
        f"DDP: {d['processes']} process(es) over {d.get('backend', '?')}: "
        + (f"ok, test accuracy {d['test_accuracy']:.4f} in {d['wall_s']} s" if d["ok"] else f"FAILED: {d['error']}")
    )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: try the script on a CPU")
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "gpu-results.json")
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        print(f"gpu-check: skipped: {sys.executable} has no PyTorch (run it with a CUDA PyTorch's Python)")
        return 0
    layout = importable()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu-check: skipped: torch {torch.__version__} sees no CUDA device on this machine")
        return 0
    from torchship.train.data import prepare_embedded

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="torchship-gpu-") as tmp:
        work = Path(tmp)
        data_dir = work / "data"
        prepare_embedded(data_dir)
        r = {
            "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "CPU",
            "devices": torch.cuda.device_count() if args.device == "cuda" else 1,
            "torch": torch.__version__,
        }
        print("every preset, fp32 and bf16 ...", flush=True)
        r["presets"] = train_presets(args.device, work, data_dir, args.epochs)
        print("resume, then export the checkpoint with its proof ...", flush=True)
        r["resume_export"] = resume_and_export(args.device, work, data_dir)
        print(f"time to {TARGET_ACCURACY:.0%} ...", flush=True)
        r["to_target"] = time_to_target(args.device, work, data_dir)
        print("DistributedDataParallel ...", flush=True)
        r["ddp"] = ddp(args.device, work, data_dir, layout)
    r["seconds"] = round(time.perf_counter() - started, 1)
    args.out.write_text(json.dumps(r, indent=2))
    print(table(r))
    print(f"wrote {args.out} ({r['seconds']} s)")
    ok = r["resume_export"]["export_proof_passed"] and r["ddp"]["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
