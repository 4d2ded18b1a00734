"""Models that take several named tensors (a text classifier's ids and mask, a recommender's floats and ids): each
request checked against the card's signature, requests of different lengths padded into one batch and cut back out
of it; numpy only, shared by both runtimes and the embedding.

Padding happens only along a dimension whose every input declares a pad value, and the proof checks that a padded
batch answers what each row alone does (export/named.py); requests that differ along any other dimension never share
a pass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..limits import MAX_BATCH_ITEMS
from ..signature import Signature, TensorSpec
from .errors import SignatureError

NUMPY = {  # every datatype a signature may name (signature.SIGNATURE_DATATYPES), as numpy holds it
    "FP32": np.float32,
    "FP16": np.float16,
    "FP64": np.float64,
    "INT64": np.int64,
    "INT32": np.int32,
    "INT16": np.int16,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "BOOL": np.bool_,
}
DATATYPE_OF = {np.dtype(v): k for k, v in NUMPY.items()} | {np.dtype(object): "BYTES"}


@dataclass(frozen=True)
class Rows:
    """One request's inputs, checked: arrays by name, its batch size and the value of each named dimension."""

    arrays: dict[str, np.ndarray]
    n: int
    dims: dict[str, int]
    context: object = None  # what a model's own step keeps from a request for its answer (a text's tokens)

    def __len__(self) -> int:
        return self.n


def v2_shape(spec: TensorSpec) -> list[int]:
    """Triton's way to state it: -1 for the batch and every named dimension."""
    return [d if isinstance(d, int) else -1 for d in spec.shape]


def types(specs: tuple[TensorSpec, ...]) -> list[dict]:
    return [{"name": t.name, "datatype": t.datatype, "shape": v2_shape(t)} for t in specs]


def largest(sig: Signature, spec: TensorSpec) -> int:
    """Elements one row of this input holds at the longest every named dimension may be."""
    return math.prod(d if isinstance(d, int) else sig.dims[d][1] for d in spec.shape[1:])


def element_limit(sig: Signature) -> int:
    """The most elements any one input of a request may hold."""
    return MAX_BATCH_ITEMS * max(largest(sig, t) for t in (*sig.inputs, *sig.served_inputs))


def padded_dims(sig: Signature) -> frozenset[str]:
    return frozenset(d for t in sig.inputs if t.pad is not None for d in t.dynamic)


def _element(index: int, shape: tuple[int, ...]) -> list[int]:
    return [int(i) for i in np.unravel_index(index, shape)]


def strings(values, where: str) -> np.ndarray:
    """BYTES elements as one object array of bytes: bytes as they are, text as UTF-8 (JSON carries strings)."""
    flat = np.asarray(values, dtype=object).reshape(-1)
    out = np.empty(flat.size, dtype=object)
    for i, v in enumerate(flat):
        if isinstance(v, (bytes, bytearray, np.bytes_)):
            out[i] = bytes(v)
        elif isinstance(v, str):
            out[i] = v.encode("utf-8", "surrogatepass")
        else:
            raise SignatureError(f"{where} element {i}: expected a string, got {type(v).__name__}")
    return out


def check(
    sig: Signature, given: Mapping[str, tuple[str, tuple[int, ...], np.ndarray]], specs: tuple[TensorSpec, ...] = ()
) -> Rows:
    """A request's tensors (name -> datatype, shape, flat data) to checked arrays, or a SignatureError naming the
    input, the dimension or the element at fault. SPECS: the tensors to check against, when not the network's inputs
    (what a model's own step takes: Signature.served_inputs)."""
    specs = specs or sig.inputs
    names = [t.name for t in specs]
    missing, unknown = [n for n in names if n not in given], sorted(set(given) - set(names))
    if missing or unknown:
        what = "; ".join(
            x for x in (f"missing {missing}" if missing else "", f"unknown {unknown[:4]}" if unknown else "") if x
        )
        raise SignatureError(f"this model takes inputs {names}: {what}")
    arrays, dims, n = {}, {}, None
    for spec in specs:
        datatype, shape, data = given[spec.name]
        where = f"input '{spec.name}'"
        if datatype != spec.datatype:
            raise SignatureError(f"{where} must be {spec.datatype}, not {datatype}")
        if len(shape) != len(spec.shape):
            raise SignatureError(f"{where} must have shape {list(spec.shape)}, got {list(shape)}")
        for axis, (want, got) in enumerate(zip(spec.shape, shape)):
            if axis == 0:
                if not 1 <= got <= MAX_BATCH_ITEMS:
                    raise SignatureError(f"{where}: batch size {got} out of 1..{MAX_BATCH_ITEMS}", 413 if got else 400)
                if n is not None and got != n:
                    raise SignatureError(f"{where}: batch size {got}, but another input has {n}")
                n = got
            elif isinstance(want, int):
                if got != want:
                    raise SignatureError(f"{where}: dimension {axis} must be {want}, got {got}")
            else:
                low, high = sig.dims[want]
                if not low <= got <= high:
                    raise SignatureError(f"{where}: {want} {got} is out of {low}..{high}", 413 if got > high else 400)
                if dims.setdefault(want, got) != got:
                    raise SignatureError(f"{where}: {want} {got}, but another input has {want} {dims[want]}")
        flat = np.asarray(data, dtype=object if spec.datatype == "BYTES" else None)
        if flat.size != math.prod(shape):
            raise SignatureError(f"{where} holds {flat.size} values for shape {list(shape)}")
        if spec.datatype == "BYTES":
            arrays[spec.name] = strings(flat, where).reshape(shape)
            continue
        x = flat.astype(NUMPY[spec.datatype], copy=False).reshape(shape)
        if x.dtype.kind == "f":
            bad = np.flatnonzero(~np.isfinite(x))
            if bad.size:
                raise SignatureError(f"{where} element {_element(bad[0], shape)}: NaN and Infinity are not inputs")
        if spec.range:
            low, high = spec.range
            bad = np.flatnonzero((x < low) | (x > high))
            if bad.size:
                value = x.reshape(-1)[bad[0]].item()
                raise SignatureError(f"{where} element {_element(bad[0], shape)}: {value} is outside {low}..{high}")
        if spec.mask and x.ndim > 1:
            empty = np.flatnonzero(~x.reshape(len(x), -1).any(axis=1))
            if empty.size:
                raise SignatureError(
                    f"{where} row {int(empty[0])}: every position is masked out; a row needs at "
                    "least one 1 (runtimes disagree on what attending to nothing means)"
                )
        arrays[spec.name] = np.ascontiguousarray(x)
    return Rows(arrays, n, dims)


def key(sig: Signature, rows: Rows) -> tuple:
    """Requests with equal keys may share a pass: they agree on every named dimension that is not padded."""
    padded = padded_dims(sig)
    return tuple(sorted((d, v) for d, v in rows.dims.items() if d not in padded))


def merge(sig: Signature, jobs: list[Rows]) -> dict[str, np.ndarray]:
    """One batch of every request's rows, each padded along its padded dimensions to the longest."""
    if len(jobs) == 1:
        return jobs[0].arrays
    longest = {d: max(r.dims[d] for r in jobs) for d in padded_dims(sig) if d in jobs[0].dims}
    feeds = {}
    for spec in sig.inputs:
        parts = []
        for r in jobs:
            x = r.arrays[spec.name]
            widths = [(0, 0)] + [
                (0, longest[d] - r.dims[d]) if isinstance(d, str) and d in longest else (0, 0) for d in spec.shape[1:]
            ]
            parts.append(np.pad(x, widths, constant_values=spec.pad) if any(w for _, w in widths) else x)
        feeds[spec.name] = np.concatenate(parts)
    return feeds


def split(sig: Signature, out: Mapping[str, np.ndarray], start: int, rows: Rows) -> dict[str, np.ndarray]:
    """A request's rows of a batch's outputs, every named dimension cut back to the request's own length."""
    answer = {}
    for spec in sig.outputs:
        index = (
            slice(start, start + rows.n),
            *(slice(0, rows.dims[d]) if isinstance(d, str) else slice(None) for d in spec.shape[1:]),
        )
        answer[spec.name] = out[spec.name][index]
    return answer


def run_together(sig: Signature, run, requests: list[Rows]) -> list[dict[str, np.ndarray]]:
    """Each request's answer, from one padded pass per group of requests that may share one (key), in order."""
    answers, groups = [None] * len(requests), {}
    for k, rows in enumerate(requests):
        groups.setdefault(key(sig, rows), []).append(k)
    for members in groups.values():
        out, start = run(merge(sig, [requests[k] for k in members])), 0
        for k in members:
            answers[k] = split(sig, out, start, requests[k])
            start += len(requests[k])
    return answers


def outputs(sig: Signature, raw: Mapping[str, np.ndarray], specs: tuple[TensorSpec, ...] = ()) -> dict[str, np.ndarray]:
    """Every output by name, in its declared datatype (SPECS: what a model's own step gives: served_outputs)."""
    return {
        t.name: strings(raw[t.name], f"output '{t.name}'").reshape(np.shape(raw[t.name]))
        if t.datatype == "BYTES"
        else np.ascontiguousarray(np.asarray(raw[t.name]).astype(NUMPY[t.datatype], copy=False))
        for t in specs or sig.outputs
    }


def zeros(sig: Signature, n: int) -> dict[str, np.ndarray]:
    """The largest batch a worker will run, each named dimension at its longest: a warm-up that shows it fits."""
    feeds = {}
    for t in sig.inputs:
        shape = (n, *(d if isinstance(d, int) else sig.dims[d][1] for d in t.shape[1:]))
        value = t.pad if t.pad is not None else (t.range[0] if t.range and not t.range[0] <= 0 <= t.range[1] else 0)
        feeds[t.name] = np.full(shape, value, NUMPY[t.datatype])
    return feeds
