"""Packs an export directory into model_store/<name>.mar with torch-model-archiver."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import KW_ONLY, asdict, dataclass, field
from pathlib import Path

import numpy as np

from torchship.runtime.card import CARD_FILE, FORMAT_BY_BACKEND, CardError, ModelCard
from torchship.serve.shipping import stage_torchserve_handler

BACKENDS = tuple(FORMAT_BY_BACKEND)
BATCH_BUDGET_MS = 50  # a full batch should take about this long, so a queued request waits at most ~2 of them


class ArchiveError(Exception):
    """The archive could not be written; one line for the user."""


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers() -> int:
    """Two workers at least, so a worker's crash or restart never leaves the model without one (bench/NOTES.md)."""
    return max(2, cores() // 2)


def max_workers() -> int:
    """More single-threaded workers than twice the cores only queue behind each other and starve the frontend."""
    return max(2, 2 * cores())


@dataclass
class ModelConfig:
    """model-config.yaml: TorchServe's per-model settings (they beat config.properties)."""

    _: KW_ONLY
    minWorkers: int = field(default_factory=default_workers)  # noqa: N815 - TorchServe's own key names
    maxWorkers: int = field(default_factory=default_workers)  # noqa: N815
    batchSize: int = 8  # noqa: N815
    maxBatchDelay: int = 1  # noqa: N815 - ms; 0 would mean TorchServe's default of 100
    responseTimeout: int = 30  # noqa: N815 - seconds
    startupTimeout: int = 120  # noqa: N815
    threads: int = 1  # handler: intra-op threads per worker
    worker_log_level: str = "WARNING"  # handler: INFO brings back TorchServe's two log lines per request
    max_pixels: int = 0  # handler: largest decoded image; 0 is handlers.images.default_max_pixels(card)

    HANDLER_KEYS = ("threads", "worker_log_level", "max_pixels")

    def yaml(self) -> str:
        d = asdict(self)
        handler = [f"  {k}: {d.pop(k)}" for k in self.HANDLER_KEYS]
        return "\n".join([f"{k}: {v}" for k, v in d.items()] + ["handler:", *handler]) + "\n"


@dataclass(frozen=True)
class Cost:
    """What one forward pass of the exported model costs on this machine, measured with one thread."""

    batch1_ms: float
    batch8_ms: float

    @property
    def per_image_batched_ms(self) -> float:
        return self.batch8_ms / 8


def measure(export_dir: Path | str, backend: str, card: ModelCard, seconds: float = 0.5) -> Cost:
    """Median forward time at batch 1 and 8 with one thread: what a single-threaded worker will see."""
    from torchship.runtime import runners

    run = runners.load(export_dir, backend, threads=1).run
    out = {}
    for n in (1, 8):
        x = np.zeros((n, *card.input_shape), np.float32)
        run(x)
        times, start = [], time.perf_counter()
        while len(times) < 3 or (time.perf_counter() - start < seconds and len(times) < 200):
            t = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - t)
        out[n] = float(np.median(times)) * 1000
    return Cost(out[1], out[8])


def sized(cost: Cost, workers: int | None = None) -> ModelConfig:
    """Batching, delay, timeout and threads from the model's measured cost instead of the digit model's."""
    workers = workers or default_workers()
    batch = int(np.clip(BATCH_BUDGET_MS // max(cost.per_image_batched_ms, 1e-3), 1, 8))
    delay = int(np.clip(round(cost.batch1_ms / 10), 1, 20))  # waiting for company costs at most a tenth of a pass
    # Threads help a model whose single pass is long; the tiny digit models only pay fork/join for them.
    threads = max(1, cores() // workers) if cost.batch1_ms > 10 else 1
    timeout = max(30, math.ceil(cost.batch1_ms * batch * 20 / 1000))
    return ModelConfig(minWorkers=workers, maxWorkers=workers, batchSize=batch, maxBatchDelay=delay,
                       responseTimeout=timeout, threads=threads)  # fmt: skip


def archiver() -> str:
    exe = Path(sys.executable).with_name("torch-model-archiver")
    return str(exe) if exe.exists() else (shutil.which("torch-model-archiver") or "torch-model-archiver")


def build_archive(
    export_dir: Path | str,
    model_store: Path | str = "model_store",
    *,
    name: str | None = None,
    backend: str = "onnx",
    config: ModelConfig | None = None,
    handler: Path | None = None,
) -> Path:
    """Write <model_store>/<name>.mar holding the model, the runtime package with its handler, the card and the config.

    config=None leaves model-config.yaml out: TorchServe's defaults (no batching, a worker per core); `handler`, a
    handler file of your own instead of ours (the bench's stock baseline).
    """
    export_dir, store = Path(export_dir), Path(model_store)
    card_path = export_dir / CARD_FILE
    if not card_path.is_file():
        raise ArchiveError(f"{card_path} not found: run `torchship export` first")
    try:
        card = ModelCard.load(card_path)
    except CardError as e:
        raise ArchiveError(f"{card_path}: {e}") from None
    if backend not in FORMAT_BY_BACKEND:
        raise ArchiveError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    fmt = FORMAT_BY_BACKEND[backend]
    model = export_dir / fmt.file
    if not model.is_file():
        raise ArchiveError(f"{model} not found: run `torchship export --formats ...,{fmt.name}` first")
    name = name or card.name
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "model-config.yaml"
        cfg.write_text(config.yaml() if config else "")
        staged = Path(tmp) / "extra"
        staged.mkdir()
        shutil.copy(card_path, staged / CARD_FILE)
        handler = Path(handler) if handler else stage_torchserve_handler(staged)
        extra = [str(staged)]  # torch-model-archiver copies a folder's contents into the archive's root
        cmd = [
            archiver(),
            "--model-name", name,
            "--version", str(card.provenance.epoch or 1),
            "--serialized-file", str(model),
            "--handler", str(handler),
            "--extra-files", ",".join(extra),
            "--export-path", str(store),
            "--force",
        ] + (["--config-file", str(cfg)] if config else [])  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ArchiveError(f"torch-model-archiver failed: {result.stderr.strip() or result.stdout.strip()}")
    return store / f"{name}.mar"
