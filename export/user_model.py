"""Where a model enters export: a torchship checkpoint, or any image classifier, detector or segmenter (vision.py) a
user names by SPEC and weights."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pickle
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from torchship.export import vision
from torchship.export.weights_enum import Preset
from torchship.handlers.card import BUILTIN_ARCHITECTURES, Architecture, CardError, ModelCard
from torchship.handlers.recipes import FRAMED_RECIPE, GREY_RECIPES
from torchship.handlers.signature import Signature
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
    if card.task in ("detect", "segment"):
        return vision.wrap(model, card.task)
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


def output_kind(out: torch.Tensor) -> str:
    """What a classifier's last layer emits, judged on a real forward pass."""
    sums = out.double().exp().sum(-1)
    if (out <= 1e-6).all() and torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
        return "log-probabilities"
    sums = out.double().sum(-1)
    if (out >= 0).all() and (out <= 1).all() and torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
        return "probabilities"
    return "logits"


def read_labels(value: str | Sequence[str] | None, classes: int | None) -> tuple[str, ...]:
    """A file with one label a line, a comma-separated list, or a weights enum's categories; default: the class
    indices. CLASSES None: as many as given (a text model's labels, checked against its output by the signature)."""
    if not value:
        return tuple(str(i) for i in range(classes or 0))
    if not isinstance(value, str):
        labels, what = [str(x) for x in value], "the weights enum names"
    elif Path(value).is_file():
        labels, what = (
            [x.strip() for x in Path(value).read_text(errors="replace").splitlines() if x.strip()],
            "--labels gives",
        )
    else:
        labels, what = [x.strip() for x in value.split(",")], "--labels gives"
    if classes is not None and len(labels) != classes:
        raise ModelLoadError(f"{what} {len(labels)} labels but the model outputs {classes} classes")
    return tuple(labels)


def slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-._").lower()[:64]
    return s or "model"


def user_model(
    spec: str,
    weights: Path | str,
    *,
    kwargs: Mapping | None = None,
    input_shape: tuple[int, ...] | None,
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
    preset: Preset | None = None,
) -> tuple[torch.nn.Module, ModelCard]:
    """Build the model, load its weights, run it once on a real batch, and write down what it is. PRESET: what a
    torchvision weights enum says (mean, std, resize, labels), over MEAN, STD and LABELS."""
    kwargs = dict(kwargs or {})
    if preset is not None:
        mean, std = preset.mean or mean, preset.std or std
        labels = preset.labels or labels
    model = load_weights(build(spec, kwargs), read_state_dict(weights), weights)
    image = input_kind == "image"
    input_shape = input_shape or (vision.working_shape(model) if image else None)
    if input_shape is None:
        raise ModelLoadError("--model needs --input-shape C,H,W: this model states no working size of its own")
    c = input_shape[0]
    try:
        with torch.no_grad():
            out = model(torch.rand(2, *input_shape))
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelLoadError(
            f"the model does not run on a (2, {', '.join(map(str, input_shape))}) batch: {type(e).__name__}: {first}"
        ) from None
    found = vision.kind_of(out) if image else None
    if found:
        if preprocess not in (None, FRAMED_RECIPE) or task or output:
            raise ModelLoadError(
                f"a {found} model's images are letterboxed and its answer is its own: drop --preprocess, --task and "
                "--output-kind"
            )
        try:
            card = vision.vision_card(
                model,
                found,
                out,
                spec=spec,
                kwargs=kwargs,
                name=name or slug(spec.rpartition(":")[2].split(".")[-1]),
                input_shape=input_shape,
                labels=read_labels(labels, None),
                mean=mean,
                std=std,
                dataset=dataset,
            )
        except (CardError, ValueError) as e:
            raise ModelLoadError(str(e)) from None
        dropped = vision.unexported(out) if found == "detect" else []
        if dropped:
            note = f"note: the model also answers {', '.join(dropped)}: the export answers its boxes, scores and labels"
            print(note + " only", file=sys.stderr)
        return vision.wrap(model, found), card
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
            resize=preset.resize if preset and preset.crop and (preprocess or "resize-crop") == "resize-crop" else None,
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
