"""One model version as a worker serves it: the card, the recipe that brings requests to the model's input, the
batcher that runs its forward passes, and its metrics. Built and warmed here; requests reach it through the pipeline
(pipeline.py), whatever their transport."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .. import sizing
from ..card import ModelCard
from ..limits import MAX_BATCH_ITEMS
from ..model import named, runners, steps
from ..model.images import Preprocessor
from ..model.responses import batch_outputs
from ..model.steps import Steps
from ..protocol import model_io, v2
from .batching import Batcher, Stacking
from .config import Config
from .metrics import Metrics
from .slots import NONE, Slots

INLINE_PASS_MS = 5.0  # a warm pass at the largest batch no longer than Python's GIL switch interval: passes run on the
# loop itself, since handing them to a thread costs more than it overlaps (bench/NOTES.md levers 52, 55)
PLATFORMS = {
    "onnx": "onnxruntime_onnx",
    "onnx-int8": "onnxruntime_onnx",
    "torchscript": "pytorch_libtorch",
    "pt2": "pytorch_aotinductor",
}


@dataclass
class Served:
    name: str
    card: ModelCard
    preprocessor: Preprocessor
    batcher: Batcher
    metrics: Metrics
    backend: str
    version: str = "1"
    directory: str = ""
    warmup: dict = field(default_factory=dict)
    limit: Callable[[str], int] = None  # the most elements a request's tensor of a datatype may hold (v2)
    outputs: list[str] = field(default_factory=list)  # the names of the outputs it answers
    labels: dict = field(default_factory=dict)  # output name -> the class names its classification reports
    overrides: dict = field(default_factory=dict)  # the model's load-time configuration (repository.ModelState)
    max_rows: int = MAX_BATCH_ITEMS  # rows one request may hold: Triton's max_batch_size
    images: bool = True  # an image model's full inputs and outputs; False: Triton's image classifier (triton_images)
    steps: Steps | None = None  # a named-input model's signature and its own step (model/steps.py)
    runs: tuple[Callable, ...] = ()  # its sessions, warmed before serving: one, or a lone pass's and a busy one's

    def __post_init__(self):
        self.limit = self.limit or model_io.element_limit(self.card)
        self.outputs = self.outputs or model_io.output_names(self.card)
        self.labels = self.labels or model_io.output_labels(self.card)

    def metadata(self, versions: list[str] | None = None) -> dict:
        return {
            "name": self.name,
            "versions": versions or [self.version],
            "platform": PLATFORMS.get(self.backend, self.backend),
            "inputs": model_io.input_types(self.card, self.images),
            "outputs": model_io.output_types(self.card, self.images),
        }

    def decode(self, tensors: list[v2.Tensor]) -> np.ndarray | named.Rows:
        """A request's v2 input tensors to the model's rows (a ProtocolError for anything it cannot take)."""
        return model_io.model_inputs(self.card, self.preprocessor, tensors, self.images, self.steps)

    def encode(self, rows, inputs: named.Rows | None = None) -> list[v2.Tensor]:
        """A request's rows of the batch's outputs to its v2 output tensors (INPUTS: its decoded rows)."""
        return [t for t in model_io.model_outputs(self.card, rows, self.steps, inputs) if t.name in self.outputs]

    async def retire(self, grace_s: float = 30) -> None:
        """Answer what this version holds, then free it: it takes no new requests once no route leads here."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while (self.batcher.queued or self.metrics.active) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        await self.batcher.stop()


def alone(config: Config) -> bool:
    """Whether a pass of THREADS threads has the cores to itself (a heavy model's lone pass holds every slot: slots.py),
    so that its threads may spin between its operators instead of sleeping (BERT-base's lone request: 0.89 of its
    time with a thread woken at each operator, bench/NOTES.md lever 87)."""
    at_once = 1 if config.adapts else min(config.pass_slots or config.workers, config.workers)
    return config.threads > 1 and config.threads * at_once <= sizing.cores()


def load(
    model_dir: str,
    config: Config,
    *,
    name: str | None = None,
    overrides: dict | None = None,
    slots: Slots = NONE,
    mapped_dir: Path | None = None,
) -> Served:
    """One export ready to serve, not yet warm; its batcher starts with the worker's event loop (or at start()).
    OVERRIDES (a load's configuration): max_batch_size caps both a request's rows and a pass's; max_batch_delay_ms.
    MAPPED_DIR: where a large ONNX model's one optimized copy is, for its sessions to map (model/mapped.py)."""
    overrides = overrides or {}
    rows = int(overrides.get("max_batch_size", 0)) or MAX_BATCH_ITEMS
    config = replace(
        config,
        max_batch=rows if "max_batch_size" in overrides else config.max_batch,
        max_batch_delay_ms=float(overrides.get("max_batch_delay_ms", config.max_batch_delay_ms)),
    )
    card = ModelCard.load(model_dir)
    name = name or card.name
    model_steps = steps.load(card.signature, model_dir)
    runner = runners.load(
        model_dir, config.backend, threads=config.threads, card=card, mapped_dir=mapped_dir, spin_in_pass=alone(config)
    )
    metrics = Metrics(name, card.version)

    busy = None
    if config.adapts:
        busy = runners.load(model_dir, config.backend, threads=config.busy_threads, card=card, mapped_dir=mapped_dir)
    forward = slots.around(runner.run, busy and busy.run)  # a heavy model's passes share the cores (slots.py)

    def run(x):  # once per forward pass: the model, then what all its requests' answers share
        return batch_outputs(card, forward(x))

    batcher = Batcher(
        run,
        max_batch=config.max_batch,
        max_batch_delay_ms=config.max_batch_delay_ms,
        max_queue=config.max_queue,
        on_pass=metrics.ran,
        stacking=stacking(card),
        max_batch_tokens=config.max_batch_tokens,
    )
    preprocessor = Preprocessor(card, config.max_pixels)
    version = Served(name, card, preprocessor, batcher, metrics, runner.backend, card.version, str(model_dir))
    version.overrides, version.max_rows, version.images = dict(overrides), rows, not config.triton_images
    version.outputs, version.steps = model_io.output_names(card, not config.triton_images), model_steps
    version.runs = (runner.run, busy.run) if busy else (runner.run,)
    return version


def stacking(card: ModelCard) -> Stacking | None:
    """Named inputs pad and group (model/named.py); one batch concatenates (the batcher's default, None)."""
    if not card.named:
        return None
    sig, padded = card.signature, named.padded_dims(card.signature)
    return Stacking(
        merge=lambda jobs: named.merge(sig, jobs),
        split=lambda out, start, rows: named.split(sig, out, start, rows),
        key=lambda rows: named.key(sig, rows),
        width=(lambda rows: math.prod(rows.dims.get(d, 1) for d in padded)) if padded else None,
    )


def warm_up(served: Served, *, proves: bool = True) -> dict:
    """Forward passes at the largest batch the batcher will make, every named dimension at its longest: a model
    that cannot run one is never ready. The warm passes' time decides where passes of several requests run: on the
    event loop when short, since a thread hand-off then costs more than it overlaps; on the pass's thread otherwise,
    so that a long pass never stalls the worker's connections (batching.Batcher._serve has the lone request's case).
    Not PROVES (a worker other than the first, which proves the full batch for the same file): one row first, and no
    more for a heavy model, whose first full pass costs what its next does (BERT-base: ~1 s of a start, lever 86)."""
    n, card = served.batcher.max_batch, served.card
    if not proves and n > 1:
        one = sizing.zero_input(card, 1)
        # on the busy session where there is one (sizing's one thread) and in no slot, so that the first worker's
        # full pass, meanwhile, finds every slot free and runs wide
        start = time.perf_counter()
        served.encode(batch_outputs(card, served.runs[-1](one)))
        ms = (time.perf_counter() - start) * 1000
        if ms >= sizing.HEAVY_MS:
            served.batcher.inline = False
            served.warmup = {"batch": 1, "ms": round(ms, 2), "inline": False}
            return served.warmup
    x = sizing.zero_input(card, n)
    start = time.perf_counter()
    served.encode(served.batcher.run(x))  # and its answer must make sense to the encoder
    ms = (time.perf_counter() - start) * 1000
    # a first pass this long leaves no doubt which side of the line the next ones fall: timing them would only delay
    # the worker's start (BERT-base: ~2 s a pass at batch 8; bench/NOTES.md lever 80); nor is a busy session's first
    # pass that long any slower than its next ones (lever 83), so it is left cold
    if ms < sizing.LONG_PASS_S * 1000:
        for run in served.runs[1:]:  # the busy session's first short pass is slow (slots.py)
            run(x)
        ms = math.inf
        for _ in range(2):
            start = time.perf_counter()
            served.batcher.run(x)
            ms = min(ms, (time.perf_counter() - start) * 1000)
    served.batcher.inline = ms <= INLINE_PASS_MS
    served.warmup = {"batch": n, "ms": round(ms, 2), "inline": served.batcher.inline}
    return served.warmup
