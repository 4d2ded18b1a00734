"""In-process inference of any export: eager PyTorch vs every exported format, and the FLOP floor of this machine."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from torchship.export.formats import present, read_card
from torchship.export.proof.verify import flops_per_image
from torchship.export.user_model import rebuild
from torchship.handlers.formats import FORMAT_BY_NAME
from torchship.handlers.model import runners
from torchship.handlers.model.onnx_model import load as load_onnx


def matmul_gflops(n: int = 1024, repeats: int = 20) -> float:
    """This machine's float32 matmul rate with every core (torch's BLAS), best of several runs."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def time_per_image(fn, batch: np.ndarray, min_seconds: float = 1.0, min_repeats: int = 30) -> float:
    """Median seconds per image over many calls, after a warm-up."""
    for _ in range(3):
        fn(batch)
    times = []
    start = time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn(batch)
        times.append(time.perf_counter() - t)
    return float(np.median(times)) / len(batch)


SMALL_MODEL_FLOPS = 1e8  # below this a lone image is too little work to split across threads (NOTES.md, lever 25)


def backends(export_dir: Path, batch: int, flops: int) -> dict:
    """Eager and every exported format, each set up as it serves best at this batch size (bench/NOTES.md)."""
    model = rebuild(read_card(export_dir))
    one_thread = batch == 1 and flops < SMALL_MODEL_FLOPS
    torch_threads = torch.get_num_threads()

    def eager(x):
        with torch.inference_mode():
            return model(torch.from_numpy(x))

    fns = {"eager": eager}
    for name in present(export_dir):
        backend = FORMAT_BY_NAME[name].backend
        if backend.startswith("onnx"):
            # batch 1: one thread, nothing to split; a big batch: every core, spinning between its many ops
            path = export_dir / FORMAT_BY_NAME[name].file
            fns[backend] = load_onnx(path, threads=1 if one_thread else 0, spinning=not one_thread).run
        else:
            fns[backend] = runners.load(export_dir, backend, threads=torch_threads).run
    torch.set_num_threads(torch_threads)
    return fns


def run(export_dir: Path | str, batch_sizes=(1, 64), rounds: int = 7, min_seconds: float = 0.3) -> dict:
    export_dir = Path(export_dir)
    card = read_card(export_dir)
    threads = torch.get_num_threads()
    flops = flops_per_image(rebuild(card), card.input_shape)
    gflops = matmul_gflops()
    rows = []
    rng = np.random.default_rng(0)
    for bs in batch_sizes:
        x = rng.standard_normal((bs, *card.input_shape)).astype(np.float32)
        fns = backends(export_dir, bs, flops)
        per_round = {name: [] for name in fns}  # interleaved, so a drift in the machine's speed hits all alike
        for _ in range(rounds):
            for name, fn in fns.items():
                per_round[name].append(time_per_image(fn, x, min_seconds=min_seconds, min_repeats=5) * 1e6)
        for name, times in per_round.items():
            ratio = [e / t for e, t in zip(per_round["eager"], times)]
            rows.append(
                {
                    "backend": name,
                    "batch": bs,
                    "us_per_image": float(np.median(times)),
                    "rounds_us": times,
                    "eager_over_this": float(np.median(ratio)),
                }
            )
    floor = flops / (gflops * 1e9) * 1e6
    return {
        "model": card.name,
        "input_shape": list(card.input_shape),
        "torch_threads": threads,
        "flops_per_image": flops,
        "matmul_gflops": gflops,
        "floor_us_per_image": floor,
        "batch_sizes": list(batch_sizes),
        "rows": rows,
    }
