"""A model's own pre- and post-processing step (signature.Step): the user's torch-free Python file shipped in the
export, run between the tensors clients send and get and the network's, the same way by both runtimes, the embedding
and the proof. Its errors are the user's code's: a ValueError it raises is the client's (400, its message), anything
else a 500 that names the step."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..fields import CardError
from ..signature import STEP_FUNCTIONS, Signature
from . import named, text
from .errors import InputError, SignatureError


class StepError(InputError):
    """The model's own step failed or gave what the signature does not declare: the server's fault, not the client's."""

    def __init__(self, message: str):
        super().__init__(500, message)


@dataclass(frozen=True)
class Steps:
    """A signature and the step functions that go with it; without a step, requests reach the network as sent.
    PREPROCESS(arrays) -> (the network's arrays, a context kept with the request); POSTPROCESS(outputs, rows): rows
    are the request's network rows, their context with them (user_step wraps a step file's plainer functions)."""

    sig: Signature
    preprocess: Callable | None = None
    postprocess: Callable | None = None
    examples: Callable | None = None  # the step file's requests for the proof (export/proof/named.py)

    def check(self, given: Mapping[str, tuple[str, tuple[int, ...], np.ndarray]]) -> named.Rows:
        """A request's tensors, checked against what clients send, through preprocess, to the network's rows."""
        rows = named.check(self.sig, given, self.sig.served_inputs)
        if self.preprocess is None:
            return rows
        out, context = _call(self.preprocess, "preprocess", dict(rows.arrays))
        try:
            arrays = {t.name: np.asarray(out[t.name]) for t in self.sig.inputs}
        except (KeyError, TypeError):
            raise StepError(
                f"the model's preprocess gave {_names(out)}, not the network's inputs "
                f"{[t.name for t in self.sig.inputs]}"
            ) from None
        try:
            checked = named.check(
                self.sig, {k: (_datatype(self.sig, k, x), x.shape, x.reshape(-1)) for k, x in arrays.items()}
            )
        except SignatureError as e:
            raise StepError(f"the model's preprocess gave what the network does not take: {e.message}") from None
        if checked.n != rows.n:
            raise StepError(f"the model's preprocess turned {rows.n} row(s) into {checked.n}")
        return replace(checked, context=context)

    def outputs(self, raw: Mapping[str, np.ndarray], rows: named.Rows | None = None) -> dict[str, np.ndarray]:
        """A request's rows of the network's outputs, through postprocess, to what clients get. ROWS: the request's
        network rows (None: a warm-up's, or a caller that has none; a step must answer without them)."""
        out = named.outputs(self.sig, raw)
        if self.postprocess is None:
            return out
        n = len(next(iter(out.values())))
        answer = _call(self.postprocess, "postprocess", out, rows)
        missing = [t.name for t in self.sig.served_outputs if not isinstance(answer, Mapping) or t.name not in answer]
        if missing:
            raise StepError(f"the model's postprocess gave {_names(answer)}, without {missing}")
        try:
            answer = named.outputs(self.sig, answer, self.sig.served_outputs)
        except (SignatureError, ValueError, TypeError) as e:
            raise StepError(f"the model's postprocess gave what its signature does not declare: {e}") from None
        wrong = [k for k, y in answer.items() if y.ndim == 0 or len(y) != n]
        if wrong:
            raise StepError(f"the model's postprocess gave {wrong} without one row for each of the {n} row(s)")
        return answer


def _call(fn: Callable, step: str, *args):
    try:
        return fn(*args)
    except InputError:
        raise
    except ValueError as e:  # the step's word that the input is wrong
        raise InputError(400, f"{step}: {str(e)[:300] or 'invalid input'}") from None
    except Exception as e:
        raise StepError(f"the model's {step} failed: {type(e).__name__}: {str(e)[:200]}") from None


def _names(out) -> str:
    return str(sorted(map(str, out))[:8]) if isinstance(out, Mapping) else type(out).__name__


def _datatype(sig: Signature, name: str, x: np.ndarray) -> str:
    """The network input's own datatype where the step's array holds the same kind of numbers (int64 for INT32)."""
    spec = next(t for t in sig.inputs if t.name == name)
    same = x.dtype != object and x.dtype.kind == np.dtype(named.NUMPY[spec.datatype]).kind
    return spec.datatype if same else named.DATATYPE_OF.get(x.dtype, str(x.dtype))


def load(sig: Signature | None, folder: str | Path) -> Steps | None:
    """The steps of a named-input model, its step file imported from the export folder and checked against the digest
    its card recorded; None for other models."""
    if sig is None:
        return None
    if sig.text:
        return Steps(sig, *text.steps(sig, Path(folder)))
    step = sig.process
    if step is None:
        return Steps(sig)
    path = Path(folder) / step.file
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CardError("signature.process", f"cannot read the model's step {path}: {e.strerror or e}") from None
    if hashlib.sha256(data).hexdigest() != step.sha256:
        raise CardError("signature.process", f"{path} is not the file that was exported (its sha256 differs)")
    module = import_file(path)
    functions = {f: getattr(module, f, None) for f in STEP_FUNCTIONS}
    for side, f in (("inputs", "preprocess"), ("outputs", "postprocess")):
        if bool(getattr(step, side)) != callable(functions[f]):
            raise CardError(
                "signature.process",
                f"{path}: {f} {'is missing' if getattr(step, side) else 'is defined'} but process.{side} "
                f"{'declares' if getattr(step, side) else 'does not declare'} what it "
                f"{'takes' if side == 'inputs' else 'gives'}",
            )
    examples = getattr(module, "examples", None)
    pre, post = functions["preprocess"], functions["postprocess"]
    return Steps(
        sig,
        (lambda arrays: (pre(arrays), None)) if pre else None,
        (lambda outputs, rows: post(outputs)) if post else None,
        examples if callable(examples) else None,
    )


def import_file(path: Path):
    """The step file as a module of its own name space (it is the user's code: any failure says which file)."""
    name = f"torchship_step_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]}"
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise CardError(
            "signature.process", f"the model's step {path} does not load: {type(e).__name__}: {e}"
        ) from None
    return module
