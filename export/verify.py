"""Proves an export computes the eager model's function: float64 eager is the reference for every backend."""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from export.artifacts import sha256
from train import checkpoint

BATCH_SIZES = (1, 2, 7, 64)
BACKENDS = ("eager-fp32", "torchscript", "onnxruntime")


class VerificationError(Exception):
    """An export that cannot be checked (missing files, changed checkpoint)."""


@dataclass
class Check:
    backend: str
    batch_size: int
    passed: bool
    shape_ok: bool
    dtype_ok: bool
    nan: int
    failures: int
    elements: int
    max_abs: float
    mean_abs: float
    p99_abs: float
    max_rel: float
    mean_rel: float
    p99_rel: float
    min_atol: float  # smallest atol that would pass at this rtol
    min_rtol: float  # smallest rtol that would pass at this atol
    top1_agreement: float | None
    worst: dict = field(default_factory=dict)


@dataclass
class Report:
    export_dir: str
    atol: float
    rtol: float
    reference: str
    inputs: dict
    checks: list[Check]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def compare(got: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> dict:
    """Polygraphy's rule: an element fails only where it exceeds both atol and rtol*|ref|; NaN always fails."""
    got64, ref64 = got.astype(np.float64), ref.astype(np.float64)
    err = np.abs(got64 - ref64)
    mag = np.abs(ref64)
    rel = err / np.maximum(mag, np.finfo(np.float64).tiny)
    nan = np.isnan(got64) | np.isnan(ref64)
    bad = nan | ((err > atol) & (err > rtol * mag))
    err_f, rel_f = np.where(nan, np.inf, err), np.where(nan, np.inf, rel)
    worst = int(np.argmax(np.where(nan, np.inf, err - rtol * mag)))
    idx = np.unravel_index(worst, ref.shape)
    with np.errstate(invalid="ignore"):  # percentiles over inf (NaN elements) are inf, as they should be
        p99_abs, p99_rel = float(np.percentile(err_f, 99)), float(np.percentile(rel_f, 99))
    return {
        "nan": int(nan.sum()),
        "failures": int(bad.sum()),
        "elements": int(err.size),
        "max_abs": float(err_f.max()),
        "mean_abs": float(err_f.mean()),
        "p99_abs": p99_abs,
        "max_rel": float(rel_f.max()),
        "mean_rel": float(rel_f.mean()),
        "p99_rel": p99_rel,
        "min_atol": float(max(0.0, (err_f - rtol * mag).max())),
        "min_rtol": float(max(0.0, ((err_f - atol) / np.maximum(mag, np.finfo(np.float64).tiny)).max())),
        "worst": {"index": [int(i) for i in idx], "got": float(got64[idx]), "expected": float(ref64[idx])},
    }


def test_inputs(meta: dict, n_real: int = 256, n_random: int = 64, data_dir: Path | str = "data") -> np.ndarray:
    """Real held-out digits (evenly over the classes) plus uniform noise over the normalised pixel range."""
    from train import data

    _, test = data.load("mnist-5k", data_dir)
    pick = np.linspace(0, len(test) - 1, n_real).round().astype(int)
    real = data.to_tensor(test.images[pick], meta["mean"], meta["std"], torch.device("cpu")).numpy()
    lo, hi = (0 - meta["mean"]) / meta["std"], (1 - meta["mean"]) / meta["std"]
    rng = np.random.default_rng(0)
    noise = rng.uniform(lo, hi, size=(n_random, *meta["input_shape"])).astype(np.float32)
    return np.concatenate([real, noise])


def backends(export_dir: Path, model: torch.nn.Module, threads: int = 0) -> dict:
    import onnxruntime as ort

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
        ts = torch.jit.load(str(export_dir / "model.ts.pt"), map_location="cpu").eval()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(export_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def torch_fn(m):
        def run(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return m(torch.from_numpy(x)).numpy()

        return run

    return {
        "eager-fp32": torch_fn(model),
        "torchscript": torch_fn(ts),
        "onnxruntime": lambda x: session.run(None, {name: x})[0],
    }


def run_batched(fn, x: np.ndarray, batch_size: int, out_shape: tuple) -> tuple[np.ndarray, bool, bool]:
    outs, shape_ok, dtype_ok = [], True, True
    for i in range(0, len(x), batch_size):
        chunk = x[i : i + batch_size]
        out = fn(np.ascontiguousarray(chunk))
        shape_ok &= out.shape == (len(chunk), *out_shape)
        dtype_ok &= out.dtype == np.float32
        outs.append(out.reshape(len(chunk), *out_shape) if out.size == len(chunk) * np.prod(out_shape) else out)
    try:
        return np.concatenate(outs), shape_ok, dtype_ok
    except ValueError:
        return np.full((len(x), *out_shape), np.nan, np.float32), False, dtype_ok


def verify(
    export_dir: Path | str,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    ckpt_path: Path | str | None = None,
    data_dir: Path | str = "data",
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
) -> Report:
    export_dir = Path(export_dir)
    for f in ("meta.json", "model.ts.pt", "model.onnx"):
        if not (export_dir / f).is_file():
            raise VerificationError(f"{export_dir / f} is missing: run `torchship export` first")
    meta = json.loads((export_dir / "meta.json").read_text())
    ckpt_path = Path(ckpt_path or meta["checkpoint"])
    if ckpt_path.is_file() and sha256(ckpt_path) != meta["checkpoint_sha256"]:
        raise VerificationError(f"{ckpt_path} changed since this export was made (sha256 differs): export again")
    model = checkpoint.model_from_checkpoint(checkpoint.load(ckpt_path, preset=meta["preset"]))
    reference_model = copy.deepcopy(model).double()
    x = test_inputs(meta, data_dir=data_dir)
    with torch.inference_mode():
        ref = reference_model(torch.from_numpy(x).double()).numpy()
    out_shape = ref.shape[1:]
    checks = []
    for backend, fn in backends(export_dir, model).items():
        for bs in batch_sizes:
            got, shape_ok, dtype_ok = run_batched(fn, x, bs, out_shape)
            stats = compare(got, ref, atol, rtol)
            top1 = None
            if meta["task"] == "classify":
                top1 = float((got.argmax(1) == ref.argmax(1)).mean())
            passed = shape_ok and dtype_ok and stats["failures"] == 0
            checks.append(Check(backend, bs, passed, shape_ok, dtype_ok, top1_agreement=top1, **stats))
    return Report(
        str(export_dir),
        atol,
        rtol,
        "eager PyTorch, float64 copy of the checkpoint's weights",
        {"real": 256, "random": 64, "total": int(len(x)), "shape": list(x.shape[1:])},
        checks,
    )


def table(report: Report) -> str:
    head = f"{'backend':<12} {'batch':>5} {'max abs':>9} {'p99 abs':>9} {'max rel':>9} {'min atol':>9} "
    head += f"{'top-1':>7} {'fails':>6}  result"
    lines = [f"reference: {report.reference}; atol {report.atol:g}, rtol {report.rtol:g}", head, "-" * len(head)]
    for c in report.checks:
        top1 = f"{c.top1_agreement:.4f}" if c.top1_agreement is not None else "n/a"
        flags = "" if c.shape_ok and c.dtype_ok else " (shape/dtype)"
        lines.append(
            f"{c.backend:<12} {c.batch_size:>5} {c.max_abs:>9.2e} {c.p99_abs:>9.2e} {c.max_rel:>9.2e} "
            f"{c.min_atol:>9.2e} {top1:>7} {c.failures:>6}  {'PASS' if c.passed else 'FAIL'}{flags}"
        )
    verdict = "all checks pass" if report.passed else f"{len(report.failures())} check(s) FAILED"
    lines.append(verdict)
    return "\n".join(lines)


def failure_message(report: Report) -> str:
    c = max(report.failures(), key=lambda c: c.max_abs)
    w = c.worst
    what = "shape or dtype differs; " if not (c.shape_ok and c.dtype_ok) else ""
    return (
        f"{c.backend} at batch size {c.batch_size} does not match eager PyTorch: {what}{c.failures} of {c.elements} "
        f"elements off (atol {report.atol:g}, rtol {report.rtol:g}); worst at input {w['index'][0]}, "
        f"output {w['index'][1:]}: got {w['got']:.6g}, expected {w['expected']:.6g}"
    )


def write_report(report: Report, export_dir: Path | str) -> Path:
    path = Path(export_dir) / "equivalence.json"
    path.write_text(json.dumps(report.to_dict(), indent=2))
    return path
