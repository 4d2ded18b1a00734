"""The proof for models that take several named tensors: every output, at several lengths of every named dimension
and today's batch sizes, on inputs drawn from the declared ranges; and, where the signature pads, that a padded
batch answers what each row alone does (the servers' batching relies on it)."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import torch

from torchship.export.inputs import draw, example_dims, lengths
from torchship.export.proof.checks import BATCH_SIZES, backends, load_for_proof
from torchship.export.proof.report import Check, Report, eager_reference
from torchship.export.proof.tolerance import compare, tolerance
from torchship.handlers.model import named, runners, steps
from torchship.handlers.signature import Signature, TensorSpec

ROWS = 16  # examples per length: batch sizes 1, 2, 7 and 16
PADDED_ROWS = 6


def _reference(model: torch.nn.Module, sig: Signature):
    """Float64 eager: floating inputs widened, integer and boolean ones as they are."""
    run = runners.named_torch_runner(copy.deepcopy(model).double(), sig)
    return lambda feeds: run({k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in feeds.items()})


def _batched(fn, feeds: dict, n: int, size: int) -> dict:
    parts = [fn({k: np.ascontiguousarray(v[i : i + size]) for k, v in feeds.items()}) for i in range(0, n, size)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _check(
    backend: str, bs: int, spec: TensorSpec, dims: dict, got: np.ndarray, ref: np.ndarray, *, atol: float, rtol: float
) -> Check:
    """Polygraphy's rule on one output; its shape and its declared datatype (float64 eager aside) must match too. An
    integer or boolean output (a count, a label, an index) is compared exactly: no tolerance makes 3 equal 4."""
    if not spec.datatype.startswith("FP"):
        atol = rtol = 0.0
    shape_ok = got.shape == ref.shape
    dtype_ok = got.dtype == np.dtype(named.NUMPY[spec.datatype])
    stats = compare(got.astype(np.float64), ref.astype(np.float64), atol, rtol) if shape_ok else _mismatch(ref)
    return Check(
        backend,
        bs,
        atol,
        rtol,
        shape_ok and dtype_ok and stats["failures"] == 0,
        shape_ok,
        dtype_ok,
        top1_agreement=None,
        output=spec.name,
        dims=dict(dims),
        **stats,
    )


def _mismatch(ref: np.ndarray) -> dict:
    return {
        "nan": 0,
        "failures": int(ref.size),
        "elements": int(ref.size),
        "max_abs": float("inf"),
        "mean_abs": float("inf"),
        "p99_abs": float("inf"),
        "max_rel": None,
        "p99_rel": None,
        "min_atol": float("inf"),
        "min_rtol": float("inf"),
        "worst": {"index": [0] * ref.ndim, "got": float("nan"), "expected": float(ref.flat[0])},
    }


def verify_named(export_dir: Path, atol: float, rtol: float, source, batch_sizes=BATCH_SIZES) -> Report:
    card, model, formats = load_for_proof(Path(export_dir), source)
    sig = card.signature
    fns = backends(Path(export_dir), model, formats)
    fns["eager-fp32"] = runners.named_torch_runner(model, sig)
    reference = _reference(model, sig)
    sizes = tuple(sorted({min(b, ROWS) for b in batch_sizes}))
    cases = lengths(sig)
    runs, refs = {}, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, dims in enumerate(cases):
            feeds = draw(sig, ROWS, dims, seed=k)
            refs.append(reference(feeds))
            for backend, fn in fns.items():
                for bs in sizes:
                    runs[backend, k, bs] = _batched(fn, feeds, ROWS, bs)
        padded = sorted(named.padded_dims(sig))
        if padded:
            requests, pad_refs = _pad_requests(sig, reference)
            for backend, fn in fns.items():
                runs[backend, "padded"] = named.run_together(sig, fn, requests)
    floats = [t.name for t in sig.outputs if t.datatype.startswith("FP")]

    def flat(outs) -> np.ndarray:
        return np.concatenate([o[n].reshape(-1).astype(np.float64) for o in outs for n in floats] or [np.zeros(0)])

    eager = [flat([runs["eager-fp32", k, bs] for k in range(len(cases))]) for bs in sizes]
    atol, note = tolerance(atol, rtol, flat(refs), eager)
    checks = []
    for backend in fns:
        for k, dims in enumerate(cases):
            for bs in sizes:
                for t in sig.outputs:
                    checks.append(
                        _check(
                            backend, bs, t, dims, runs[backend, k, bs][t.name], refs[k][t.name], atol=atol, rtol=rtol
                        )
                    )
        if padded:
            for t in sig.outputs:
                for r, (answer, ref) in enumerate(zip(runs[backend, "padded"], pad_refs)):
                    got = answer[t.name]
                    checks.append(
                        _check(
                            backend,
                            PADDED_ROWS,
                            t,
                            {d: f"padded, row {r}" for d in padded},
                            got,
                            ref[t.name],
                            atol=atol,
                            rtol=rtol,
                        )
                    )
    if sig.process:
        checks += _step_checks(Path(export_dir), sig, fns, reference, atol=atol, rtol=rtol)
    inputs = {
        "named": True,
        "rows": ROWS,
        "cases": cases,
        "padded": padded,
        "inputs": [{"name": t.name, "datatype": t.datatype, "range": list(t.range) or None} for t in sig.inputs],
    }
    return Report(str(export_dir), atol, rtol, eager_reference(card.name), inputs, checks, tolerance_note=note)


def _step_checks(export_dir: Path, sig: Signature, fns: dict, reference, *, atol: float, rtol: float) -> list[Check]:
    """The model's own step around every format, as the servers run it (model/steps.py), on the step file's
    examples(): each format's answer after postprocess against float64 eager's after the same step. Strings are
    compared exactly."""
    step = steps.load(sig, export_dir)
    if step.examples is None:
        raise ValueError(
            f"{sig.process.file}: define examples(), a list of requests (dicts of arrays by name) to prove on"
        )
    requests = step.examples()
    if not isinstance(requests, (list, tuple)) or not requests:
        raise ValueError(f"{sig.process.file}: examples() must give a non-empty list of requests")
    checks = []
    for r, request in enumerate(requests):
        given = {
            k: (_datatype(sig, k, np.asarray(v)), np.shape(v), np.asarray(v, object).reshape(-1))
            for k, v in request.items()
        }
        rows = step.check(given)
        ref = step.outputs(reference(rows.arrays))
        for backend, fn in fns.items():
            got = step.outputs(fn(rows.arrays))
            for t in sig.served_outputs:
                dims = {"example": r, **rows.dims}
                if t.datatype == "BYTES":
                    checks.append(_bytes_check(backend, len(rows), t, dims, got[t.name], ref[t.name]))
                else:
                    checks.append(_check(backend, len(rows), t, dims, got[t.name], ref[t.name], atol=atol, rtol=rtol))
    return checks


def _datatype(sig: Signature, name: str, x: np.ndarray) -> str:
    spec = next((t for t in sig.served_inputs if t.name == name), None)
    return spec.datatype if spec else named.DATATYPE_OF.get(x.dtype, str(x.dtype))


def _bytes_check(backend: str, bs: int, spec: TensorSpec, dims: dict, got: np.ndarray, ref: np.ndarray) -> Check:
    shape_ok = got.shape == ref.shape
    bad = np.flatnonzero(got != ref) if shape_ok else np.arange(ref.size)
    stats = _mismatch(np.zeros(ref.shape)) | {"failures": int(bad.size), "elements": int(ref.size)}
    if not bad.size:
        stats |= {"max_abs": 0.0, "mean_abs": 0.0, "p99_abs": 0.0, "min_atol": 0.0, "min_rtol": 0.0, "worst": {}}
    else:
        i = int(bad[0])
        stats["worst"] = {
            "index": [i],
            "got": repr(got.reshape(-1)[i]) if shape_ok else None,
            "expected": repr(ref.reshape(-1)[i]),
        }
    return Check(
        backend,
        bs,
        0.0,
        0.0,
        shape_ok and not bad.size,
        shape_ok,
        got.dtype == object,
        top1_agreement=None,
        output=spec.name,
        dims=dict(dims),
        **stats,
    )


def _pad_requests(sig: Signature, reference) -> tuple[list[named.Rows], list[dict]]:
    """PADDED_ROWS one-example requests whose padded dimensions run from shortest to longest, and each one's answer
    alone."""
    padded = named.padded_dims(sig)
    requests, refs = [], []
    for r in range(PADDED_ROWS):
        dims = {
            d: (low + (high - low) * r // max(PADDED_ROWS - 1, 1) if d in padded else example_dims(sig)[d])
            for d, (low, high) in sig.dims.items()
        }
        feeds = draw(sig, 1, dims, seed=100 + r)
        requests.append(named.Rows(feeds, 1, dims))
        refs.append(reference(feeds))
    return requests, refs
