"""Runs an exported model file on a normalised batch, whatever its format; torch only for the formats that need it."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..card import ModelCard
from ..formats import FORMAT_BY_BACKEND, FORMATS
from ..signature import Signature
from .mapped import mapped, worth_it
from .vision import detect_runner


@dataclass(frozen=True)
class Runner:
    backend: str
    path: Path
    run: Callable  # (N, C, H, W) float32 -> raw output, float32; named inputs: {name: array} -> {name: array}


def find(model_dir: str | os.PathLike) -> str:
    """The backend of the one model file an archive's directory holds."""
    for f in FORMATS:
        if (Path(model_dir) / f.file).is_file():
            return f.backend
    raise FileNotFoundError(f"no model file in {model_dir} (expected one of {', '.join(f.file for f in FORMATS)})")


# ONNX Runtime's graph optimisation levels by the names `session_options` takes (GraphOptimizationLevel's members)
OPTIMIZATION = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def session_options(threads: int = 1, optimization: str = "all", spinning: bool = False, *, spin_in_pass: bool = False):
    """Small models want one thread per worker (no fork/join cost, no fight over cores) and full graph fusion.
    SPIN_IN_PASS, for a pass that has the cores to itself: its threads spin between its operators, not after it
    (BERT-base's lone request 0.89 of its time with a sleeping thread woken at each operator, bench/NOTES.md lever
    87)."""
    import onnxruntime as ort  # lazily: an archive of TorchScript or pt2 runs without it

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION[optimization])
    if spin_in_pass:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    elif not spinning:  # idle threads would otherwise busy-wait and steal cores from other workers
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def onnx_runner(
    path: Path,
    threads: int,
    sig: Signature | None = None,
    all_outputs: bool = False,
    optimization: str = "all",
    *,
    spin_in_pass: bool = False,
) -> Callable:
    import onnxruntime as ort  # lazily: an archive of TorchScript or pt2 runs without it

    options = session_options(threads, optimization, spin_in_pass=spin_in_pass)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    if sig is not None:
        names = [o.name for o in session.get_outputs()]
        return lambda feeds: dict(zip(names, session.run(None, {t.name: feeds[t.name] for t in sig.inputs})))
    name = session.get_inputs()[0].name
    if all_outputs:  # a detector's boxes, scores and labels
        return lambda x: session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})
    return lambda x: session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def named_torch_runner(module, sig: Signature) -> Callable:
    """Inputs in the signature's order; outputs (a tuple, or AOTInductor's list) named in theirs."""
    import torch  # lazily: the torch-free runtime imports torch only for a TorchScript or pt2 model

    def run(feeds: dict) -> dict:
        with torch.inference_mode():
            out = module(*(torch.from_numpy(np.ascontiguousarray(feeds[t.name])) for t in sig.inputs))
        out = out if isinstance(out, (list, tuple)) else (out,)
        return {t.name: y.numpy() for t, y in zip(sig.outputs, out)}

    return run


def torch_runner(module, all_outputs: bool = False) -> Callable:
    """ALL_OUTPUTS: every output as numpy (a detector's boxes, scores and labels); else the first, as float32."""
    import torch  # lazily: the torch-free runtime imports torch only for a TorchScript or pt2 model

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        if all_outputs:
            return [y.numpy() for y in out]
        if isinstance(out, (list, tuple)):  # AOTInductor packages return a list of outputs
            out = out[0]
        return out.float().numpy()

    return run


def load(
    model_dir: str | os.PathLike,
    backend: str | None = None,
    threads: int = 1,
    card: ModelCard | None = None,
    *,
    mapped_dir: Path | None = None,
    spin_in_pass: bool = False,
) -> Runner:
    """The card says whether the model takes one batch, named inputs or an image a pass (a detector); without it, one
    batch. MAPPED_DIR: where a large ONNX model's optimized copy is kept for every session to map (mapped.py).
    SPIN_IN_PASS: an ONNX Runtime session whose passes have the cores to themselves (session_options)."""
    runner = _load(model_dir, backend, threads, card, mapped_dir, spin_in_pass)
    if card is not None and card.task == "detect":
        return Runner(runner.backend, runner.path, detect_runner(runner.run, card.thresholds["detections"]))
    return runner


def _load(
    model_dir, backend: str | None, threads: int, card: ModelCard | None, mapped_dir: Path | None, spin_in_pass: bool
) -> Runner:
    backend = backend or find(model_dir)
    sig = card.signature if card is not None else None
    detect = card is not None and card.task == "detect"
    wrap = (lambda m: named_torch_runner(m, sig)) if sig is not None else (lambda m: torch_runner(m, detect))
    if backend not in FORMAT_BY_BACKEND:
        raise ValueError(f"unknown backend {backend!r}; choose one of: {', '.join(FORMAT_BY_BACKEND)}")
    path = Path(model_dir) / FORMAT_BY_BACKEND[backend].file
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: export it first (`torchship export --formats ...`)")
    if FORMAT_BY_BACKEND[backend].onnxruntime:
        optimized = mapped(path, mapped_dir) if mapped_dir is not None and worth_it(path) else None
        if optimized is not None:  # optimized once already: the session has nothing left to do
            return Runner(
                backend,
                path,
                onnx_runner(optimized, threads, sig, detect, optimization="disable", spin_in_pass=spin_in_pass),
            )
        return Runner(backend, path, onnx_runner(path, threads, sig, all_outputs=detect, spin_in_pass=spin_in_pass))
    import torch  # lazily: the torch-free runtime imports torch only for a TorchScript or pt2 model

    torch.set_num_threads(threads)  # one per worker: workers must not fight over the cores
    if backend == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation notice
            module = torch.jit.load(str(path), map_location="cpu").eval()
        return Runner(backend, path, wrap(module))
    import torch._inductor  # lazily: 2 s more, for a pt2 model only

    return Runner(backend, path, wrap(torch._inductor.aoti_load_package(str(path))))
