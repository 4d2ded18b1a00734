"""Packs an export directory into model_store/<name>.mar with torch-model-archiver."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import KW_ONLY, asdict, dataclass, field
from pathlib import Path

from torchship.handlers.card import CARD_FILE, CardError, ModelCard
from torchship.handlers.formats import FORMAT_BY_BACKEND, served_files
from torchship.handlers.sizing import MAX_BATCH, Sizing, default_workers
from torchship.serve.settings import WORKER_LOG_LEVEL
from torchship.serve.shipping import stage_torchserve_handler

BACKENDS = tuple(FORMAT_BY_BACKEND)


class ArchiveError(Exception):
    """The archive could not be written; one line for the user."""


@dataclass
class ModelConfig:
    """model-config.yaml: TorchServe's per-model settings (they beat config.properties)."""

    _: KW_ONLY
    minWorkers: int = field(default_factory=default_workers)  # noqa: N815 - TorchServe's own key names
    maxWorkers: int = field(default_factory=default_workers)  # noqa: N815
    batchSize: int = MAX_BATCH  # noqa: N815
    maxBatchDelay: int = 1  # noqa: N815 - ms; 0 would mean TorchServe's default of 100
    responseTimeout: int = 30  # noqa: N815 - seconds
    startupTimeout: int = 120  # noqa: N815
    threads: int = 1  # handler: intra-op threads per worker
    worker_log_level: str = WORKER_LOG_LEVEL  # handler: INFO brings back two log lines per request
    max_pixels: int = 0  # handler: largest decoded image; 0 is handlers.images.default_max_pixels(card)
    # handler: each worker loads its own copy of a large ONNX model's weights instead of mapping one (model/mapped.py)
    copy_weights: bool = False

    HANDLER_KEYS = ("threads", "worker_log_level", "max_pixels", "copy_weights")

    def yaml(self) -> str:
        d = asdict(self)
        handler = [f"  {k}: {d.pop(k)}" for k in self.HANDLER_KEYS]
        return "\n".join([f"{k}: {v}" for k, v in d.items()] + ["handler:", *handler]) + "\n"


def model_config(sizing: Sizing, **handler) -> ModelConfig:
    """TorchServe's spelling of the shared sizing rule (torchship.handlers.sizing)."""
    return ModelConfig(
        minWorkers=sizing.workers,
        maxWorkers=sizing.workers,
        batchSize=sizing.max_batch,
        maxBatchDelay=sizing.max_batch_delay_ms,
        responseTimeout=sizing.timeout_s,
        threads=sizing.split_threads,
        **handler,
    )


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
        for f in served_files(card, backend):  # the model file goes in as torch-model-archiver's serialized file
            if f != fmt.file:
                shutil.copy(export_dir / f, staged / f)
        handler = Path(handler) if handler else stage_torchserve_handler(staged)
        extra = [str(staged)]  # torch-model-archiver copies a folder's contents into the archive's root
        cmd = [
            sys.executable,
            "-m",
            "model_archiver.model_packaging",  # torch-model-archiver, wherever its script is
            "--model-name",
            name,
            "--version",
            str(card.provenance.epoch or 1),
            "--serialized-file",
            str(model),
            "--handler",
            str(handler),
            "--extra-files",
            ",".join(extra),
            "--export-path",
            str(store),
            "--force",
        ] + (["--config-file", str(cfg)] if config else [])
        # torch-model-archiver stages the files in $TMPDIR/<model name>, removing whatever is there first: two archives
        # of one name at once (two CI jobs, two test workers) broke each other's ("Failed to save the model-archive")
        private = Path(tmp) / "archiver"
        private.mkdir()
        result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TMPDIR": str(private)})
    if result.returncode != 0:
        raise ArchiveError(f"torch-model-archiver failed: {result.stderr.strip() or result.stdout.strip()}")
    return store / f"{name}.mar"
