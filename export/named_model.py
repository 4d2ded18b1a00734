"""A model that takes several named tensors, as `torchship export --model --signature` brings it: its signature read
(a JSON file or a dict in the user's code), its own step (--process) or tokenizer (--tokenizer) attached and checked,
the model built, run once on inputs drawn from the signature and held to what it declares."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch

from torchship.export.inputs import draw, example_dims
from torchship.export.user_model import (
    TORCH_DATATYPES,
    ModelLoadError,
    Signed,
    build,
    load_weights,
    module_of_file,
    read_state_dict,
    slug,
)
from torchship.handlers.card import Architecture, CardError, ModelCard
from torchship.handlers.formats import STEP_FILE, digest
from torchship.handlers.model import steps
from torchship.handlers.model import text as text_step
from torchship.handlers.recipes import NO_RECIPE
from torchship.handlers.signature import Signature, Text, validate_signature


def read_signature(value: str) -> Signature:
    """A JSON file, or `file.py:NAME` naming a dict (or a function returning one) in the user's own code."""
    where, sep, attr = value.rpartition(":")
    try:
        if sep and where.endswith(".py"):
            found = _attribute(where, attr)
            obj = found() if callable(found) else found
        else:
            obj = json.loads(Path(value).read_text())
    except OSError as e:
        raise ModelLoadError(f"--signature {value}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise ModelLoadError(f"--signature {value}: not JSON ({e})") from None
    if not isinstance(obj, Mapping):
        raise ModelLoadError(f"--signature {value}: expected an object with 'inputs', 'outputs' and 'dims'")
    try:
        unknown = sorted(set(obj) - {"inputs", "outputs", "dims", "process"})
        if unknown:
            raise CardError(f"signature.{unknown[0]}", "unknown field (known: dims, inputs, outputs, process)")
        process = obj.get("process")
        if process is not None and (not isinstance(process, Mapping) or set(process) - {"inputs", "outputs"}):
            raise CardError("signature.process", "expected an object with 'inputs' and/or 'outputs' (the step's)")
        sig = Signature(
            inputs=obj.get("inputs", ()), outputs=obj.get("outputs", ()), dims=obj.get("dims") or {}, process=process
        )
        validate_signature(sig)
    except CardError as e:
        raise ModelLoadError(f"--signature {value}: {e}") from None
    return sig


def _attribute(path: str, attr: str):
    """An attribute of a user's file, callable or not."""
    module = module_of_file(Path(path), f"--signature {path}:{attr}")
    if not hasattr(module, attr):
        raise ModelLoadError(f"--signature {path}:{attr}: {path} has no attribute {attr!r}")
    return getattr(module, attr)


def named_model(
    spec: str,
    weights: Path | str,
    *,
    kwargs: Mapping | None = None,
    sig: Signature,
    name: str | None = None,
    process: Path | str | None = None,
    text: Text | None = None,
    tokenizer: Path | str | None = None,
) -> tuple[torch.nn.Module, ModelCard]:
    """A model that takes several named tensors: built, its weights loaded, run once on inputs drawn from its
    signature, every output checked against what the signature declares. PROCESS: the model's own step file, which
    the signature's `process` says what it takes and gives (it is copied into the export by export_model)."""

    kwargs = dict(kwargs or {})
    sig = with_step(sig, process)
    built = load_weights(build(spec, kwargs), read_state_dict(weights), weights)
    if text is not None:
        sig = with_text(sig, text, tokenizer, built)
    model = Signed(built, sig).eval()
    feeds = draw(sig, 2, example_dims(sig))
    try:
        with torch.no_grad():
            out = model(*(torch.from_numpy(feeds[t.name]) for t in sig.inputs))
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelLoadError(
            f"the model does not run on its signature's inputs ({', '.join(model.input_names)}): "
            f"{type(e).__name__}: {first}"
        ) from None
    if len(out) != len(sig.outputs) or not all(isinstance(y, torch.Tensor) for y in out):
        raise ModelLoadError(
            f"the model answers {len(out)} value(s); the signature declares {len(sig.outputs)} "
            f"tensors ({', '.join(model.output_names)})"
        )
    dims = example_dims(sig)
    for t, y in zip(sig.outputs, out):
        want = [2, *(d if isinstance(d, int) else dims[d] for d in t.shape[1:])]
        got = TORCH_DATATYPES.get(y.dtype, str(y.dtype))
        if got != t.datatype or list(y.shape) != want:
            raise ModelLoadError(
                f"output '{t.name}': the model answers {got} {list(y.shape)} where the signature "
                f"declares {t.datatype} {list(t.shape)} (= {want} here)"
            )
    try:
        card = ModelCard(
            name=name or slug(spec.rpartition(":")[2].split(".")[-1]),
            task="tensors",
            input_shape=(),
            mean=(),
            std=(),
            labels=(),
            preprocess=NO_RECIPE,
            output_kind="tensors",
            architecture=Architecture(spec, kwargs),
            input_kind="named",
            signature=sig,
        )
    except CardError as e:
        raise ModelLoadError(str(e)) from None
    return model, card


def with_step(sig: Signature, process: Path | str | None) -> Signature:
    """The signature with its step's file and digest, once the file loads with the functions the signature says it
    has (model/steps.load)."""
    if process is None:
        if sig.process:
            raise ModelLoadError("the signature declares a step (process): give its file with --process FILE.py")
        return sig
    path = Path(process)
    if not sig.process:
        raise ModelLoadError(
            f"--process {path}: declare what it takes and gives in the signature's process: "
            '{"inputs": [...], "outputs": [...]} (docs/export.md: A model\'s own step)'
        )
    try:
        step = replace(sig.process, file=path.name, sha256=digest(path))
        steps.load(replace(sig, process=step), path.parent)
    except OSError as e:
        raise ModelLoadError(f"--process {path}: cannot read it ({e.strerror or e})") from None
    except CardError as e:
        raise ModelLoadError(f"--process {path}: {str(e).split(': ', 1)[-1]}") from None
    return replace(sig, process=replace(step, file=STEP_FILE))


def tokenizer_file(path: Path | str) -> Path:
    """A tokenizer.json, or the folder `save_pretrained` wrote it into."""
    path = Path(path)
    return path / "tokenizer.json" if path.is_dir() else path


def with_text(sig: Signature, text: Text, tokenizer: Path | str | None, model: torch.nn.Module) -> Signature:
    """The signature of a text model: its tokenizer's digest, and its labels from the model's own id2label (Hugging
    Face's config) where none are given; the tokenizer loaded once to show it can be."""
    if tokenizer is None:
        raise ModelLoadError("a text model needs its tokenizer: --tokenizer tokenizer.json (or the folder holding it)")
    path = tokenizer_file(tokenizer)
    if not path.is_file():
        raise ModelLoadError(f"--tokenizer {tokenizer}: no tokenizer.json there")
    labels = text.labels
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if not labels and text.task != "embed" and isinstance(id2label, Mapping):
        labels = tuple(str(id2label[k]) for k in sorted(id2label, key=int))
    text = replace(text, sha256=digest(path), labels=labels)
    try:
        sig = replace(sig, text=text)
        validate_signature(sig)
        text_step.tokenizer(replace(sig, text=replace(text, tokenizer=path.name)), path.parent)
    except CardError as e:
        raise ModelLoadError(f"--tokenizer {tokenizer}: {e}") from None
    return sig
