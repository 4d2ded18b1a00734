"""What REST and gRPC share inside one worker of the Open Inference Protocol server for one model version: the model,
its batcher and its metrics. One request, whatever its protocol: decode (v2 tensors to normalised rows), batch and
predict (the batcher), encode (rows to v2 output tensors)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from . import runners, signature, v2
from .batching import Batcher, Stacking
from .card import ModelCard
from .images import Preprocessor
from .metrics import Metrics
from .responses import batch_outputs

DECODE_THREADS = 2  # large requests are parsed and decoded here, off the event loop; a bounded pool, a bounded queue
DECODE_INLINE_BYTES = 64 * 1024  # larger requests (photos, long JSON) are parsed and decoded in that pool
INLINE_PASS_MS = 5.0  # a warm pass at the largest batch no longer than Python's GIL switch interval: passes run on the
# loop itself, since handing them to a thread costs more than it overlaps (bench/NOTES.md levers 52, 55)
ABANDONED = 499  # nginx's "client closed request": counted in the metrics, never sent (no one is there to read it)
PLATFORMS = {
    "onnx": "onnxruntime_onnx",
    "onnx-int8": "onnxruntime_onnx",
    "torchscript": "pytorch_libtorch",
    "pt2": "pytorch_aotinductor",
}
_decoder: ThreadPoolExecutor | None = None
ACCESS = logging.getLogger("torchship.access")  # one line per inference request, when the server's --access_log asks


def access(protocol: str, client: str, model: str, version: str, status: int, seconds: float, request_id: str) -> None:
    """The access log's line: who asked which model version, what it got, how long it took, the request's id (the
    one its trace carries)."""
    ACCESS.info(
        "%s %s %s/%s %d %.2fms id=%s",
        protocol,
        client or "-",
        model,
        version,
        status,
        seconds * 1000,
        request_id or "-",
    )


def decoder() -> ThreadPoolExecutor:
    """The worker's one decode pool, shared by every model it serves."""
    global _decoder
    if _decoder is None:
        _decoder = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode")
    return _decoder


@dataclass(frozen=True)
class Settings:
    """How every version a worker serves runs: chosen once by the supervisor (sizing) or by its flags."""

    backend: str = "onnx"
    threads: int = 1
    max_pixels: int = 0
    max_batch: int = 8
    max_delay_ms: float = 1.0
    max_queue: int = 64


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
    ready: bool = False
    warmup: dict = field(default_factory=dict)
    limit: Callable[[str], int] = None  # the most elements a request's tensor of a datatype may hold (v2)

    def __post_init__(self):
        self.limit = self.limit or v2.element_limit(self.card)

    @property
    def decoder(self) -> ThreadPoolExecutor:
        return decoder()

    def metadata(self, versions: list[str] | None = None) -> dict:
        return {
            "name": self.name,
            "versions": versions or [self.version],
            "platform": PLATFORMS.get(self.backend, self.backend),
            "inputs": v2.input_types(self.card),
            "outputs": v2.output_types(self.card),
        }

    def decode(self, tensors: list[v2.Tensor]) -> np.ndarray:
        return v2.model_inputs(self.card, self.preprocessor, tensors)

    async def predict(self, rows: np.ndarray) -> list[v2.Tensor]:
        return v2.model_outputs(self.card, await self.batcher.submit(rows))

    async def retire(self, grace_s: float = 30) -> None:
        """Answer what this version holds, then free it: it takes no new requests once no route leads here."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while (self.batcher.queued or self.metrics.active) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        await self.batcher.stop()


def load(model_dir: str, settings: Settings, *, name: str | None = None) -> Served:
    """One export ready to serve, not yet warm; its batcher starts with the worker's event loop (or at start())."""
    card = ModelCard.load(model_dir)
    name = name or card.name
    runner = runners.load(model_dir, settings.backend, threads=settings.threads, card=card)
    metrics = Metrics(name, card.version)

    def run(x):  # once per forward pass: the model, then what all its requests' answers share
        return batch_outputs(card, runner.run(x))

    batcher = Batcher(
        run,
        max_batch=settings.max_batch,
        max_delay=settings.max_delay_ms / 1000,
        max_queue=settings.max_queue,
        on_pass=metrics.ran,
        **stacking(card),
    )
    return Served(
        name,
        card,
        Preprocessor(card, settings.max_pixels),
        batcher,
        metrics,
        runner.backend,
        card.version,
        str(model_dir),
    )


def stacking(card: ModelCard) -> dict:
    """Named inputs pad and group (signature.py); one batch concatenates (the batcher's default)."""
    if not card.named:
        return {}
    sig = card.signature
    return {
        "stacking": Stacking(
            merge=lambda jobs: signature.merge(sig, jobs),
            split=lambda out, start, rows: signature.split(sig, out, start, rows),
            key=lambda rows: signature.key(sig, rows),
        )
    }


def warm_up(served: Served) -> dict:
    """Forward passes at the largest batch the batcher will make, every named dimension at its longest: a model
    that cannot run one is never ready. The warm passes' time decides where passes of several requests run: on the
    event loop when short, since a thread hand-off then costs more than it overlaps; on the pass's thread otherwise,
    so that a long pass never stalls the worker's connections (batching.Batcher._serve has the lone request's case)."""
    n, card = served.batcher.max_batch, served.card
    x = signature.zeros(card.signature, n) if card.named else np.zeros((n, *card.input_shape), np.float32)
    v2.model_outputs(served.card, served.batcher.run(x))  # and its answer must make sense to the encoder
    ms = math.inf
    for _ in range(2):
        start = time.perf_counter()
        served.batcher.run(x)
        ms = min(ms, (time.perf_counter() - start) * 1000)
    served.batcher.inline = ms <= INLINE_PASS_MS
    served.warmup = {"batch": n, "ms": round(ms, 2), "inline": served.batcher.inline}
    return served.warmup
