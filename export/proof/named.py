"""The proof for models that take several named tensors: every output, at several lengths of every named dimension
and today's batch sizes, on inputs drawn from the declared ranges; and, where the signature pads, that a padded
batch answers what each row alone does (the servers' batching relies on it)."""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from torchship.export.inputs import draw, example_dims, lengths
from torchship.export.proof.agreement import approximate_named
from torchship.export.proof.checks import BATCH_SIZES, backends, load_for_proof
from torchship.export.proof.report import Check, Report, eager_reference
from torchship.export.proof.tolerance import compare, tolerance
from torchship.handlers.model import named, runners, steps
from torchship.handlers.signature import TEXT_INPUT, TEXT_PAIR_INPUT, Signature, TensorSpec

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
        "worst": {"index": [0] * ref.ndim, "got": float("nan"), "expected": float(ref.flat[0]) if ref.size else None},
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
    if sig.text:
        checks += _text_checks(Path(export_dir), sig, fns, reference, atol=atol, rtol=rtol)
    inputs = {
        "named": True,
        "rows": ROWS,
        "cases": cases,
        "padded": padded,
        "inputs": [{"name": t.name, "datatype": t.datatype, "range": list(t.range) or None} for t in sig.inputs],
    }
    approximations = approximate_named(Path(export_dir), card, model, formats)
    return Report(
        str(export_dir),
        atol,
        rtol,
        eager_reference(card.name),
        inputs,
        checks,
        tolerance_note=note,
        approximations=approximations,
    )


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


TEXTS = (  # short, unicode, empty, and one past any sequence's longest (truncated, or refused: then left out)
    "torchship serves models",
    "Na\u00efve caf\u00e9 \u2014 \u6771\u4eac, \U0001f642 and CAPITALS!",
    "",
    "train export serve " * 400,
)


def _text_checks(export_dir: Path, sig: Signature, fns: dict, reference, *, atol: float, rtol: float) -> list[Check]:
    """The served path of a text model against a reference built without it: transformers' own tokenizer on each
    text alone, float64 eager PyTorch, the task's answer computed here in float64; every format through the export's
    tokenizer and task (model/text.py), all texts in one padded batch. The token ids must agree exactly."""
    from transformers import PreTrainedTokenizerFast  # seconds of imports, for text models' proofs alone

    text = sig.text
    step = steps.load(sig, export_dir)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(export_dir / text.tokenizer))
    seq = sig.inputs[0].dynamic[0]
    low, high = sig.dims[seq]
    cases = [(t, p) for t, p in zip(TEXTS, TEXTS[1:] + TEXTS[:1])] if text.pairs else [(t,) for t in TEXTS]
    cases = [c for c in cases if text.truncate or len(hf(*c)["input_ids"]) <= high]
    names = (TEXT_INPUT, TEXT_PAIR_INPUT)[: len(cases[0])]
    rows = step.check(
        {n: ("BYTES", (len(cases),), np.array([c[k].encode() for c in cases], object)) for k, n in enumerate(names)}
    )
    texts = [c[0] for c in cases]
    checks, refs = [], []
    for i, case in enumerate(cases):
        enc = hf(
            *case,
            truncation=text.truncate,
            max_length=high,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
            return_token_type_ids="token_type_ids" in rows.arrays,
        )
        n = len(enc["input_ids"])
        same = (
            all(
                list(rows.arrays[name][i, :n]) == list(enc[name])
                for name in ("input_ids", "token_type_ids")
                if name in rows.arrays
            )
            and int(rows.arrays.get("attention_mask", np.ones_like(rows.arrays["input_ids"]))[i].sum()) == n
        )
        stats = _mismatch(np.zeros(n)) | {
            "failures": 0 if same else n,
            "elements": n,
            "max_abs": 0.0,
            "mean_abs": 0.0,
            "p99_abs": 0.0,
            "min_atol": 0.0,
            "min_rtol": 0.0,
            "worst": {},
        }
        checks.append(
            Check(
                "tokenizer",
                1,
                0.0,
                0.0,
                same,
                True,
                True,
                top1_agreement=None,
                output="input_ids",
                dims={"text": i, seq: n},
                **stats,
            )
        )
        feeds = {s.name: np.asarray([enc[s.name]], named.NUMPY[s.datatype]) for s in sig.inputs if s.name in enc}
        y = reference(feeds)[sig.outputs[0].name].astype(np.float64)
        refs.append(_text_answer(text, y, enc))
    for backend, fn in fns.items():
        got = step.outputs(fn(rows.arrays), rows)
        for i, ref in enumerate(refs):
            dims = {"text": i}
            for name, want in ref.items():
                spec = next(s for s in sig.served_outputs if s.name == name)
                have = got[name][i : i + 1]
                if spec.datatype == "BYTES" and name == "entities":
                    have, want = _entity_arrays(have[0]), _entity_arrays(want[0])
                    checks.append(_bytes_check(backend, len(texts), spec, dims, have[0], want[0]))
                    if have[1].size != want[1].size or not want[1].size:
                        continue  # a differing set of tokens fails above; no tokens, no scores
                    checks.append(
                        _check(
                            backend,
                            len(texts),
                            replace(spec, datatype="FP32"),
                            dims,
                            have[1],
                            want[1],
                            atol=atol,
                            rtol=rtol,
                        )
                    )
                elif spec.datatype == "BYTES":
                    checks.append(_bytes_check(backend, len(texts), spec, dims, have, want))
                else:
                    checks.append(_check(backend, len(texts), spec, dims, have, want, atol=atol, rtol=rtol))
    return checks


def _text_answer(text, y: np.ndarray, enc) -> dict:
    """The task's answer for one text (y: the network's first output for it alone), in float64."""
    if text.task == "classify":
        p = np.exp(y - y.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return {
            "probabilities": p.astype(np.float32),
            "label": np.array([text.labels[int(p[0].argmax())].encode()], object),
        }
    if text.task == "embed":
        if y.ndim == 3:
            y = y[:, 0] if text.pooling == "cls" else y.mean(1)  # one text alone: every token is in its mask
        if text.normalize:
            y = y / np.maximum(np.linalg.norm(y, axis=-1, keepdims=True), 1e-12)
        return {"embedding": y.astype(np.float32)}
    p = np.exp(y - y.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    found = []
    for j, k in enumerate(p[0].argmax(-1)):
        if enc["special_tokens_mask"][j] or text.labels[k] == "O":
            continue
        start, end = enc["offset_mapping"][j]
        found.append({"entity": text.labels[k], "score": float(p[0, j, k]), "index": j, "start": start, "end": end})
    return {"entities": np.array([json.dumps(found).encode()], object)}


def _entity_arrays(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    """A row's entities as what must agree exactly (label, index, offsets) and their scores."""
    found = json.loads(blob)
    keys = np.array([f"{e['entity']}:{e['index']}:{e['start']}:{e['end']}".encode() for e in found], object)
    return keys, np.array([e["score"] for e in found], np.float32)


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
