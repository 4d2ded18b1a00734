"""Packs an export directory into model_store/<name>.mar with torch-model-archiver."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

HANDLERS = Path(__file__).resolve().parents[1] / "handlers"
HANDLER_MODULES = ("preprocess.py", "request.py", "onnx_model.py")


def default_workers() -> int:
    """One single-threaded worker per two cores: the other core serves the frontend's JVM (bench/NOTES.md)."""
    return max(1, (os.cpu_count() or 2) // 2)


@dataclass
class ModelConfig:
    """model-config.yaml: TorchServe's per-model settings (they beat config.properties)."""

    minWorkers: int = field(default_factory=default_workers)  # noqa: N815 - TorchServe's own key names
    maxWorkers: int = field(default_factory=default_workers)  # noqa: N815
    batchSize: int = 8  # noqa: N815
    maxBatchDelay: int = 1  # noqa: N815 - ms; 0 would mean TorchServe's default of 100
    responseTimeout: int = 30  # noqa: N815 - seconds
    startupTimeout: int = 120  # noqa: N815
    threads: int = 1  # handler: intra-op threads per worker
    worker_log_level: str = "WARNING"  # handler: INFO brings back TorchServe's two log lines per request

    HANDLER_KEYS = ("threads", "worker_log_level")

    def yaml(self) -> str:
        d = asdict(self)
        handler = [f"  {k}: {d.pop(k)}" for k in self.HANDLER_KEYS]
        return "\n".join([f"{k}: {v}" for k, v in d.items()] + ["handler:", *handler]) + "\n"


def archiver() -> str:
    exe = Path(sys.executable).with_name("torch-model-archiver")
    return str(exe) if exe.exists() else (shutil.which("torch-model-archiver") or "torch-model-archiver")


def build_archive(
    export_dir: Path | str,
    model_store: Path | str = "model_store",
    name: str | None = None,
    backend: str = "onnx",
    config: ModelConfig | None = ModelConfig(),
    handler: Path | None = None,
) -> Path:
    """Write <model_store>/<name>.mar holding the model, our handler and its modules, meta.json and the config.

    config=None leaves model-config.yaml out: TorchServe's defaults (no batching, a worker per core).
    """
    export_dir, store = Path(export_dir), Path(model_store)
    meta_path = export_dir / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: run `torchship export` first")
    meta = json.loads(meta_path.read_text())
    name = name or meta["preset"]
    model = export_dir / {"onnx": "model.onnx", "torchscript": "model.ts.pt"}[backend]
    if not model.is_file():
        raise FileNotFoundError(f"{model} not found: run `torchship export` first")
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "model-config.yaml"
        cfg.write_text(config.yaml() if config else "")
        extra = [str(HANDLERS / m) for m in HANDLER_MODULES] + [str(meta_path)]
        cmd = [
            archiver(),
            "--model-name", name,
            "--version", str(meta.get("checkpoint_epoch", 1)),
            "--serialized-file", str(model),
            "--handler", str(handler or HANDLERS / "image_handler.py"),
            "--extra-files", ",".join(extra),
            "--export-path", str(store),
            "--force",
        ] + (["--config-file", str(cfg)] if config else [])  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"torch-model-archiver failed: {result.stderr.strip() or result.stdout.strip()}")
    return store / f"{name}.mar"
