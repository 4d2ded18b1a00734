"""Where a model enters export: a torchship checkpoint, or any image classifier a user names by SPEC and weights."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import pickle
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from torchship.export.inputs import draw, example_dims
from torchship.handlers.card import BUILTIN_ARCHITECTURES, Architecture, CardError, ModelCard
from torchship.handlers.formats import STEP_FILE, digest
from torchship.handlers.model import steps
from torchship.handlers.model import text as text_step
from torchship.handlers.recipes import GREY_RECIPES, NO_RECIPE
from torchship.handlers.signature import Signature, Text, validate_signature
from torchship.train import checkpoint
from torchship.train.models import build_builtin

STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model")  # where common checkpoint layouts keep the weights
SAVE_HINT = "save a state dict instead: torch.save(model.state_dict(), 'weights.pt')"


class ModelLoadError(Exception):
    """The model could not be built or its weights not loaded; one line for the user."""


def import_callable(spec: str):
    """`package.module:callable` or `path/to/file.py:Callable` (attributes may be dotted: `mod:Outer.build`)."""
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise ModelLoadError(f"--model {spec!r}: expected package.module:callable or path/to/file.py:Callable")
    if where.endswith(".py") or "/" in where or "\\" in where:
        module = module_of_file(Path(where), f"--model {spec!r}")
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:
            raise ModelLoadError(f"--model {spec!r}: cannot import {where} ({type(e).__name__}: {e})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelLoadError(f"--model {spec!r}: {where} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelLoadError(f"--model {spec!r}: {attr} is not callable")
    return obj


def module_of_file(path: Path, what: str):
    """A user's .py file, imported under a name of its own."""
    if not path.is_file():
        raise ModelLoadError(f"{what}: no such file {path}")
    name = "torchship_user_model_" + re.sub(r"\W", "_", str(path.resolve()))
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up by name
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ModelLoadError(f"{what}: importing {path} failed ({type(e).__name__}: {e})") from None
    return module


def parse_kwargs(pairs: Sequence[str]) -> dict:
    """key=value pairs; values are Python literals (num_classes=10, dims=[1, 2]) or else plain strings."""
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ModelLoadError(f"--model-kwarg {pair!r}: expected key=value with a Python name as the key")
        try:
            out[key] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            out[key] = raw.strip()
    return out


def build(spec: str, kwargs: Mapping) -> torch.nn.Module:
    """Our own architectures directly; anything else by importing the spec."""
    if spec in BUILTIN_ARCHITECTURES.values():
        return build_builtin(spec, kwargs)
    factory = import_callable(spec)
    try:
        model = factory(**dict(kwargs))
    except Exception as e:
        raise ModelLoadError(f"{spec}(**{dict(kwargs)}) failed ({type(e).__name__}: {e})") from None
    if not isinstance(model, torch.nn.Module):
        raise ModelLoadError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def read_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    """A state dict, or one nested under a usual key; a pickled module is refused (unpickling runs code)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "eights only" in str(e) or "weights_only" in str(e):
            raise ModelLoadError(
                f"{path} pickles Python objects (a whole model?), which torchship refuses to "
                f"load because unpickling can run code; {SAVE_HINT}"
            ) from None
        raise ModelLoadError(f"{path} is not a PyTorch weights file ({e})") from None
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelLoadError(f"{path} is not a readable PyTorch weights file ({first})") from None
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        obj = next((obj[k] for k in STATE_DICT_KEYS if k in obj and _is_state_dict(obj[k])), obj)
    if not isinstance(obj, Mapping) or not _is_state_dict(obj):
        raise ModelLoadError(f"{path} holds a {type(obj).__name__}, not a state dict (names -> tensors); {SAVE_HINT}")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _is_state_dict(obj) -> bool:
    """Names -> tensors; an empty one is the state of a model without parameters (Triton's `simple` adds and
    subtracts)."""
    return isinstance(obj, Mapping) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def load_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: Path | str) -> torch.nn.Module:
    result = model.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(
            f"{len(result.missing_keys)} missing ({', '.join(result.missing_keys[:3])}"
            f"{', ...' if len(result.missing_keys) > 3 else ''})"
        )
    if result.unexpected_keys:
        problems.append(
            f"{len(result.unexpected_keys)} unexpected ({', '.join(result.unexpected_keys[:3])}"
            f"{', ...' if len(result.unexpected_keys) > 3 else ''})"
        )
    if problems:
        raise ModelLoadError(f"{source} does not fit the model: keys {'; '.join(problems)}")
    return model.eval()


def rebuild(card: ModelCard, source: Path | str | None = None) -> torch.nn.Module:
    """The eager model an export was made from, from its card and the weights file it names."""
    source = Path(source or card.provenance.source or "")
    if not source.is_file():
        raise ModelLoadError(f"the weights this export was made from are not at {source}: pass their path")
    if card.architecture.spec in BUILTIN_ARCHITECTURES.values():
        ckpt = checkpoint.load(source)
        return checkpoint.model_from_checkpoint(ckpt)
    model = load_weights(build(card.architecture.spec, card.architecture.kwargs), read_state_dict(source), source)
    return Signed(model, card.signature).eval() if card.named else model


TORCH_DATATYPES = {
    torch.float32: "FP32",
    torch.float16: "FP16",
    torch.float64: "FP64",
    torch.int64: "INT64",
    torch.int32: "INT32",
    torch.int16: "INT16",
    torch.int8: "INT8",
    torch.uint8: "UINT8",
    torch.bool: "BOOL",
}


class Signed(torch.nn.Module):
    """A model called with its named inputs as keywords, answering a tuple in its outputs' declared order (from a
    tensor, a tuple, or a dict-like output such as Hugging Face's): the one form every format traces."""

    def __init__(self, model: torch.nn.Module, sig: Signature):
        super().__init__()
        self.model = model
        self.input_names = [t.name for t in sig.inputs]
        self.output_names = [t.name for t in sig.outputs]

    def forward(self, *args):
        out = self.model(**dict(zip(self.input_names, args)))
        if isinstance(out, Mapping):
            return tuple(out[name] for name in self.output_names)
        if isinstance(out, (list, tuple)):
            return tuple(out)
        return (out,)


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


def output_kind(out: torch.Tensor) -> str:
    """What a classifier's last layer emits, judged on a real forward pass."""
    sums = out.double().exp().sum(-1)
    if (out <= 1e-6).all() and torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
        return "log-probabilities"
    sums = out.double().sum(-1)
    if (out >= 0).all() and (out <= 1).all() and torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
        return "probabilities"
    return "logits"


def read_labels(value: str | None, classes: int) -> tuple[str, ...]:
    """A file with one label a line, or a comma-separated list; default: the class indices."""
    if not value:
        return tuple(str(i) for i in range(classes))
    path = Path(value)
    if path.is_file():
        labels = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    else:
        labels = [x.strip() for x in value.split(",")]
    if len(labels) != classes:
        raise ModelLoadError(f"--labels gives {len(labels)} labels but the model outputs {classes} classes")
    return tuple(labels)


def slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-._").lower()[:64]
    return s or "model"


def user_model(
    spec: str,
    weights: Path | str,
    *,
    kwargs: Mapping | None = None,
    input_shape: tuple[int, ...],
    labels: str | None = None,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
    preprocess: str | None = None,
    name: str | None = None,
    output: str | None = None,
    dataset: str | None = None,
    input_kind: str = "image",
    task: str | None = None,
    output_names: Sequence[str] | None = None,
    input_range: tuple[float, float] | None = None,
) -> tuple[torch.nn.Module, ModelCard]:
    """Build the model, load its weights, run it once on a real batch, and write down what it is."""
    kwargs = dict(kwargs or {})
    model = load_weights(build(spec, kwargs), read_state_dict(weights), weights)
    image = input_kind == "image"
    c = input_shape[0]
    try:
        with torch.no_grad():
            out = model(torch.rand(2, *input_shape))
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelLoadError(
            f"the model does not run on a (2, {', '.join(map(str, input_shape))}) batch: {type(e).__name__}: {first}"
        ) from None
    if isinstance(out, (list, tuple)):
        raise ModelLoadError(f"the model returns a {type(out).__name__}; torchship exports models with one output")
    reconstruct = image and tuple(out.shape) == (2, *input_shape)
    if not reconstruct and out.dim() != 2:
        raise ModelLoadError(f"a model must return (batch, outputs); this one returns {tuple(out.shape)}")
    task = (
        "reconstruct"
        if reconstruct
        else task or ("regress" if not image and output_names and not labels else "classify")
    )
    if task == "regress":
        width = out.shape[1]
        output_names = tuple(output_names or (["y"] if width == 1 else [f"y{i}" for i in range(width)]))
        if len(output_names) != width:
            raise ModelLoadError(f"--output-names gives {len(output_names)} names but the model outputs {width} values")
    try:
        card = ModelCard(
            name=name or slug(spec.rpartition(":")[2].split(".")[-1]),
            task=task,
            input_kind=input_kind,
            input_shape=input_shape,
            mean=tuple(mean),
            std=tuple(std),
            labels=read_labels(labels, out.shape[1]) if task == "classify" else (),
            output_names=tuple(output_names) if task == "regress" else (),
            preprocess=preprocess or ("standardize" if not image else "resize-crop" if c == 3 else "resize"),
            output_kind={"reconstruct": "image", "regress": "values"}.get(task) or output or output_kind(out),
            architecture=Architecture(spec, kwargs),
            dataset=dataset,
            input_range=(tuple(input_range),) * c if input_range and not image else (),
        )
    except CardError as e:
        raise ModelLoadError(str(e)) from None
    if card.preprocess in GREY_RECIPES and c != 1:
        raise ModelLoadError(f"--preprocess {card.preprocess} is for 1-channel models")
    return model, card


def from_checkpoint(path: Path | str) -> tuple[torch.nn.Module, ModelCard, int]:
    """A torchship checkpoint's eager model, its card and its epoch."""
    ckpt = checkpoint.load(path)
    return checkpoint.model_from_checkpoint(ckpt), ckpt.card, ckpt.epoch
