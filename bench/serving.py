"""Serving: TorchServe as its stock MNIST example runs it vs `make serve`'s defaults, same load test."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from serve import server
from serve.archive import ModelConfig, build_archive
from serve.loadtest import Target, sweep

BASELINE_HANDLER = Path(__file__).with_name("baseline_handler.py")


def measure(
    name: str,
    export_dir: Path,
    work: Path,
    backend: str,
    config: ModelConfig | None,
    handler: Path | None,
    concurrency=(1, 4, 16),
    duration: float = 10,
    max_requests: int = 30000,
) -> dict:
    store, state = work / f"store-{name}", work / f"state-{name}"
    build_archive(export_dir, store, name="mnist", backend=backend, config=config, handler=handler)
    cfg = server.ServerConfig("mnist", str(store), str(state), *server.free_ports(3))
    cfg = server.start(cfg, timeout=240)
    try:
        key = server.keys(state).get("inference", {}).get("key")
        levels = sweep(
            Target("127.0.0.1", cfg.inference_port, "mnist", key, cfg.metrics_url),
            concurrency,
            duration,
            max_requests,
            warmup=3000,
        )
    finally:
        server.stop(state)
    return {"backend": backend, "config": asdict(config) if config else "TorchServe defaults",
            "levels": [asdict(lv) for lv in levels]}  # fmt: skip


def run(export_dir: Path, work: Path, duration: float = 10, ours_config: ModelConfig | None = None) -> dict:
    baseline = measure("baseline", export_dir, work, "torchscript", None, BASELINE_HANDLER, duration=duration)
    ours = measure("ours", export_dir, work, "onnx", ours_config or ModelConfig(), None, duration=duration)
    return {"baseline": baseline, "ours": ours}
