"""In-process inference: eager PyTorch vs TorchScript vs ONNX Runtime, and the FLOP floor of this machine."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch

from handlers.onnx_model import load as load_onnx
from train import checkpoint


def flops_per_image(model: torch.nn.Module, shape=(1, 1, 28, 28)) -> int:
    """Multiply-adds x 2 of every conv and linear layer, counted from the shapes a forward pass produces."""
    total = [0]

    def hook(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total[0] += 2 * k * output.numel()
        elif isinstance(module, torch.nn.Linear):
            total[0] += 2 * module.in_features * output.numel()

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    with torch.no_grad():
        model(torch.zeros(shape))
    for h in handles:
        h.remove()
    return total[0]


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
    for _ in range(10):
        fn(batch)
    times = []
    start = time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn(batch)
        times.append(time.perf_counter() - t)
    return float(np.median(times)) / len(batch)


def run(export_dir: Path, ckpt_path: Path, batch_sizes=(1, 64)) -> dict:
    threads = torch.get_num_threads()
    model = checkpoint.model_from_checkpoint(checkpoint.load(ckpt_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = torch.jit.load(str(export_dir / "model.ts.pt")).eval()

    def torch_fn(m):
        def f(x):
            with torch.inference_mode():
                return m(torch.from_numpy(x))

        return f

    backends = {
        "eager": torch_fn(model),
        "torchscript": torch_fn(ts),
        "onnxruntime": None,
    }
    flops = flops_per_image(model)
    gflops = matmul_gflops()
    rows, rounds = [], 7
    rng = np.random.default_rng(0)
    for bs in batch_sizes:
        x = rng.standard_normal((bs, 1, 28, 28)).astype(np.float32)
        # batch 1: one thread, nothing to split; a big batch: every core, spinning between its many ops
        ort_model = load_onnx(export_dir / "model.onnx", threads=1 if bs == 1 else 0, spinning=bs > 1)
        fns = {name: fn or ort_model.run for name, fn in backends.items()}
        # interleaved rounds, so a drift in the machine's speed hits every backend alike
        per_round = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                per_round[name].append(time_per_image(fn, x, min_seconds=0.3, min_repeats=10) * 1e6)
        for name, times in per_round.items():
            ratio = [e / t for e, t in zip(per_round["eager"], times)]
            rows.append({"backend": name, "batch": bs, "us_per_image": float(np.median(times)),
                         "rounds_us": times, "eager_over_this": float(np.median(ratio))})  # fmt: skip
    floor = flops / (gflops * 1e9) * 1e6
    return {"torch_threads": threads, "flops_per_image": flops, "matmul_gflops": gflops,
            "floor_us_per_image": floor, "rows": rows}  # fmt: skip
