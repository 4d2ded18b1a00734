"""The model card: the one typed contract between training, export, serving and apps; stdlib only.

It ships inside every archive and beside every ONNX model, so it imports nothing of ours and no torch.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

SCHEMA_VERSION = 4  # 2: tensor inputs and regression (input_kind, output_names, units, input_range); 3: version;
# 4: named inputs and outputs (signature)
CARD_FILE = "meta.json"  # beside the model files of an export, and inside every archive
ONNX_METADATA_KEY = "torchship"  # ONNX metadata_props entry holding the card's JSON
TORCHSCRIPT_EXTRA_FILE = "meta.json"  # TorchScript extra file holding the card's JSON

TASKS = ("classify", "reconstruct", "regress", "tensors")  # tensors: every output answered by name, as computed
# An image file; a fixed-shape array of numbers per example (tensors.py); or several named tensors (signature.py).
INPUT_KINDS = ("image", "tensor", "named")
OUTPUT_KINDS = ("logits", "log-probabilities", "probabilities", "image", "values", "tensors")
OUTPUT_NAMES = {
    "logits": "logits",
    "log-probabilities": "log_probs",
    "probabilities": "probabilities",
    "image": "reconstruction",
    "values": "values",
}
INPUT_NAMES = {"image": "images", "tensor": "input"}
# How an image someone sends is brought to the model's input (handlers/images.py implements each).
IMAGE_RECIPES = ("mnist-digit", "fashion", "resize", "resize-crop")
NO_RECIPE = "none"  # named inputs: the model takes what the client sends, checked against the signature
TENSOR_RECIPE = "standardize"  # (x - mean) / std per entry of the first axis; mean 0, std 1 leaves x as it is
RECIPES = (*IMAGE_RECIPES, TENSOR_RECIPE)
MAX_TENSOR_ELEMENTS = 1 << 20  # per example
BATCH_DIM = "batch"  # a signature's first dimension, always: requests of any batch size are stacked along it
# The datatypes a signature may name (v2's names); BF16 stays out: numpy, and so every runtime, has no bfloat16.
SIGNATURE_DATATYPES = ("FP32", "FP16", "FP64", "INT64", "INT32", "BOOL")
MAX_DIM = 1 << 20  # a named dimension's largest allowed upper bound
GREY_RECIPES = ("mnist-digit", "fashion")  # they find light ink on a dark ground: one channel only
CROP_RATIO = 0.875  # torchvision's classification presets: resize to 256, centre-crop 224
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
VERSION_PATTERN = re.compile(r"^[1-9][0-9]{0,17}$")  # Triton's: a positive integer, as text (URLs, gRPC, tritonclient)
TENSOR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:/-]{0,127}$")
# The architectures a torchship checkpoint may name: a checkpoint is data, so it never picks code to import.
BUILTIN_ARCHITECTURES = {
    "mlp": "torchship.train.models:MLP",
    "convnet": "torchship.train.models:ConvNet",
    "autoencoder": "torchship.train.models:AutoEncoder",
    "linear": "torchship.train.models:LinearRegression",
}
# Cards and checkpoints written before torchship became one package name `train.models:ConvNet`: the one alias.
LEGACY_ARCHITECTURES = {spec.removeprefix("torchship."): spec for spec in BUILTIN_ARCHITECTURES.values()}


@dataclass(frozen=True)
class Format:
    """One exported form of the model: its --formats name, its serving backend and its file."""

    name: str
    backend: str
    file: str
    exact: bool = True  # False: an approximation (int8), judged by accuracy rather than element-wise error


FORMATS = (
    Format("ts", "torchscript", "model.ts.pt"),
    Format("onnx", "onnx", "model.onnx"),
    Format("pt2", "pt2", "model.pt2"),
    Format("int8", "onnx-int8", "model.int8.onnx", exact=False),
)
FORMAT_BY_NAME = {f.name: f for f in FORMATS}
DEFAULT_FORMATS = ("ts", "onnx")  # what `torchship export` writes unless told: seconds to build (README)
FORMAT_BY_BACKEND = {f.backend: f for f in FORMATS}


class CardError(ValueError):
    """A card that does not validate; the message names the field and what is wrong with it."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"model card field '{field_name}': {message}")


@dataclass(frozen=True)
class Architecture:
    """How to rebuild the eager model: `package.module:callable` or `path/file.py:Callable`, and its arguments."""

    spec: str
    kwargs: Mapping = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "spec", LEGACY_ARCHITECTURES.get(self.spec, self.spec))


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output: its v2 datatype, its shape (the batch first, a name for each dynamic dimension),
    the values an input may hold (token ids within the vocabulary, masks 0..1) and what pads a shorter row."""

    name: str
    datatype: str
    shape: tuple  # ("batch", "sequence") or ("batch", 13): integers and dimension names
    range: tuple = ()  # inputs: (min, max) of every value, inclusive; the proof draws from it, servers enforce it
    pad: float | int | None = None  # inputs: the value that lengthens a row to a batch's longest (a mask's 0)
    mask: bool = False  # an attention mask: 1 where a row has a token, 0 after; a row of 0s has no defined answer

    def __post_init__(self):
        object.__setattr__(self, "shape", _sequence(f"{self.name}.shape", self.shape))
        object.__setattr__(self, "range", _sequence(f"{self.name}.range", self.range))

    @property
    def dynamic(self) -> tuple[str, ...]:
        """The named dimensions after the batch."""
        return tuple(d for d in self.shape[1:] if isinstance(d, str))


@dataclass(frozen=True)
class Signature:
    """Every input and output of a model that takes several named tensors, and the allowed range of each named
    dimension (batch's is the servers' own limit)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: Mapping = field(default_factory=dict)  # "sequence" -> (min, max), inclusive

    def __post_init__(self):
        for side in ("inputs", "outputs"):
            specs = _sequence(side, getattr(self, side))
            object.__setattr__(
                self, side, tuple(s if isinstance(s, TensorSpec) else _sub(TensorSpec, side, s) for s in specs)
            )
        if not isinstance(self.dims, Mapping):
            raise CardError("signature.dims", f"expected an object of name: [min, max], got {self.dims!r}"[:200])
        object.__setattr__(self, "dims", {k: tuple(_sequence(f"dims.{k}", v)) for k, v in self.dims.items()})

    def to_dict(self) -> dict:
        def spec(t: TensorSpec) -> dict:
            return {
                "name": t.name,
                "datatype": t.datatype,
                "shape": list(t.shape),
                **({"range": list(t.range)} if t.range else {}),
                **({"pad": t.pad} if t.pad is not None else {}),
                **({"mask": True} if t.mask else {}),
            }

        return {
            "inputs": [spec(t) for t in self.inputs],
            "outputs": [spec(t) for t in self.outputs],
            "dims": {k: list(v) for k, v in self.dims.items()},
        }


@dataclass(frozen=True)
class Provenance:
    """Where the exported weights came from and what made them."""

    source: str | None = None  # the checkpoint or state-dict file
    source_sha256: str | None = None
    epoch: int | None = None
    torch: str | None = None
    onnx: str | None = None
    onnxruntime: str | None = None
    created_at: str | None = None  # ISO 8601, UTC


@dataclass(frozen=True)
class ModelCard:
    name: str
    task: str
    input_shape: tuple[int, ...]  # images: (C, H, W); tensors: one example's shape, e.g. (1,), (13,), (3, 128)
    mean: tuple[float, ...]  # per entry of the first axis: per channel of pixels in [0, 1], or per feature
    std: tuple[float, ...]
    labels: tuple[str, ...]
    preprocess: str
    output_kind: str
    architecture: Architecture
    provenance: Provenance = Provenance()
    input_name: str = ""  # "" means the input kind's usual name
    output_name: str = ""  # "" means the output kind's usual name
    resize: int | None = None  # resize-crop: the shorter side before the centre crop
    dataset: str | None = None  # the torchship dataset whose held-out images the proof uses
    metrics: Mapping = field(default_factory=dict)  # what training measured (test accuracy, ...)
    input_kind: str = "image"
    output_names: tuple[str, ...] = ()  # regress: one name per output value ("y")
    units: tuple[str, ...] = ()  # regress: one unit per output value, or none
    input_range: tuple = ()  # tensors: (min, max) seen in training per entry of the first axis, for the proof
    version: str = "1"  # which export of this model: /v2/models/NAME/versions/VERSION (cards before schema 3: "1")
    signature: Signature | None = None  # input_kind "named": every input and output (the fields above stay empty)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        object.__setattr__(self, "input_shape", _sequence("input_shape", self.input_shape))
        object.__setattr__(self, "mean", tuple(float(m) for m in _floats("mean", self.mean, self.channels)))
        object.__setattr__(self, "std", tuple(float(s) for s in _floats("std", self.std, self.channels)))
        object.__setattr__(self, "labels", _sequence("labels", self.labels))
        for name in ("output_names", "units"):
            object.__setattr__(self, name, _sequence(name, getattr(self, name)))
        object.__setattr__(
            self,
            "input_range",
            tuple(tuple(r) if isinstance(r, (list, tuple)) else r for r in _sequence("input_range", self.input_range)),
        )
        if isinstance(self.signature, Mapping):
            object.__setattr__(self, "signature", _sub(Signature, "signature", self.signature))
        if not self.input_name:
            object.__setattr__(self, "input_name", INPUT_NAMES.get(self.input_kind, "input"))
        if not self.output_name:
            object.__setattr__(self, "output_name", OUTPUT_NAMES.get(self.output_kind, "output"))
        if self.preprocess == "resize-crop" and self.resize is None:
            object.__setattr__(self, "resize", round(max(self.input_shape[1:]) / CROP_RATIO))
        validate(self)

    @property
    def channels(self) -> int:
        shape = self.input_shape
        return shape[0] if isinstance(shape, tuple) and shape and isinstance(shape[0], int) else 1

    @property
    def classes(self) -> int:
        return len(self.labels)

    @property
    def image(self) -> bool:
        return self.input_kind == "image"

    @property
    def named(self) -> bool:
        return self.input_kind == "named"

    @property
    def outputs(self) -> int:
        """Numbers per example the model answers: classes, output values, or the reconstructed input."""
        return self.classes if self.task == "classify" else len(self.output_names) or 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["architecture"]["kwargs"] = dict(self.architecture.kwargs)
        for k in ("input_shape", "mean", "std", "labels", "output_names", "units"):
            d[k] = list(d[k])
        d["input_range"] = [list(r) for r in self.input_range]
        d["metrics"] = dict(self.metrics)
        d["signature"] = self.signature.to_dict() if self.signature else None
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Mapping) -> ModelCard:
        if not isinstance(d, Mapping):
            raise CardError("(card)", f"expected a JSON object, got {type(d).__name__}")
        if "schema_version" not in d and "preset" in d:
            return from_legacy(d)
        version = d.get("schema_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise CardError("schema_version", f"expected an integer, got {version!r}")
        if version > SCHEMA_VERSION:
            raise CardError(
                "schema_version", f"{version} is newer than this torchship reads ({SCHEMA_VERSION}): upgrade torchship"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CardError(unknown[0], f"unknown field (known: {', '.join(sorted(known))})")
        missing = [f.name for f in fields(cls) if f.name not in d and f.default is f.default_factory is MISSING]
        if missing:
            raise CardError(missing[0], "missing")
        kw = dict(d)
        kw["architecture"] = _sub(Architecture, "architecture", d["architecture"])
        kw["provenance"] = _sub(Provenance, "provenance", d.get("provenance") or {})
        return cls(**kw)

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelCard:
        try:
            d = json.loads(text)
        except ValueError as e:
            raise CardError("(card)", f"not valid JSON ({e})") from None
        return cls.from_dict(d)

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        path = Path(path)
        if path.is_dir():
            path = path / CARD_FILE
        try:
            text = path.read_text()
        except OSError as e:
            raise CardError("(card)", f"cannot read {path}: {e.strerror or e}") from None
        return cls.from_json(text)

    def with_provenance(self, **changes) -> ModelCard:
        return replace(self, provenance=replace(self.provenance, **changes))


def _sequence(name: str, value) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise CardError(name, f"expected a list, got {value!r}"[:200])
    return tuple(value)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _floats(name: str, value, channels: int) -> tuple:
    if _is_number(value):
        return (value,) * channels
    if not isinstance(value, (list, tuple)) or not all(_is_number(v) for v in value):
        raise CardError(name, f"expected a list: one number, or one per channel; got {value!r}"[:200])
    if len(value) == 1:
        return tuple(value) * channels
    return tuple(value)


def _sub(cls, name: str, value):
    if not isinstance(value, Mapping):
        raise CardError(name, f"expected an object, got {value!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise CardError(f"{name}.{unknown[0]}", f"unknown field (known: {', '.join(sorted(known))})")
    try:
        return cls(**value)
    except TypeError as e:
        raise CardError(name, str(e)) from None


def safe_name(name) -> bool:
    """Names become file names, archive names and URL paths: a short slug, no separators, no '..'."""
    return isinstance(name, str) and bool(NAME_PATTERN.match(name)) and ".." not in name


def validate(card: ModelCard) -> None:
    def need(ok: bool, name: str, message: str) -> None:
        if not ok:
            raise CardError(name, message)

    need(
        safe_name(card.name),
        "name",
        f"{card.name!r} is not a safe name (letters, digits, '_', '-', '.', "
        "at most 64, starting with a letter or digit)",
    )
    need(card.task in TASKS, "task", f"{card.task!r} is not one of {', '.join(TASKS)}")
    need(
        card.output_kind in OUTPUT_KINDS, "output_kind", f"{card.output_kind!r} is not one of {', '.join(OUTPUT_KINDS)}"
    )
    need(
        (card.task == "reconstruct") == (card.output_kind == "image"),
        "output_kind",
        f"a {card.task} model cannot output {card.output_kind!r}",
    )
    need(
        (card.task == "regress") == (card.output_kind == "values"),
        "output_kind",
        f"a {card.task} model cannot output {card.output_kind!r}",
    )
    need(card.input_kind in INPUT_KINDS, "input_kind", f"{card.input_kind!r} is not one of {', '.join(INPUT_KINDS)}")
    need(card.named == (card.signature is not None), "signature", "a named-input card has a signature; others none")
    need(
        card.named == (card.task == "tensors") == (card.output_kind == "tensors"),
        "task",
        "named inputs go with task and output_kind 'tensors' (every output answered by name), and only they",
    )
    if card.named:
        need(
            not card.input_shape and not card.mean and not card.std and not card.labels,
            "input_shape",
            "a named-input card keeps its shapes in the signature: input_shape, mean, std and labels stay empty",
        )
        need(card.preprocess == NO_RECIPE, "preprocess", f"named inputs are taken as sent: preprocess {NO_RECIPE!r}")
        validate_signature(card.signature)
    else:
        _validate_single(card, need)
    need(card.dataset is None or isinstance(card.dataset, str), "dataset", f"expected a name, got {card.dataset!r}")
    need(
        isinstance(card.version, str) and bool(VERSION_PATTERN.match(card.version)),
        "version",
        f"{card.version!r} is not a version: a positive integer, as text",
    )
    spec = card.architecture.spec
    need(isinstance(spec, str) and ":" in spec, "architecture.spec", f"expected 'module:callable', got {spec!r}")
    need(isinstance(card.architecture.kwargs, Mapping), "architecture.kwargs", "expected an object")
    need(isinstance(card.metrics, Mapping), "metrics", "expected an object")


def validate_signature(sig: Signature) -> None:
    """Names unique and usable on the wire, shapes batch-first, every named dimension given a range, ranges sane."""

    def need(ok: bool, name: str, message: str) -> None:
        if not ok:
            raise CardError(f"signature.{name}", message)

    for name, (low, high) in ((k, v if len(v) == 2 else (0, -1)) for k, v in sig.dims.items()):
        need(
            isinstance(name, str) and bool(TENSOR_NAME.match(name)) and name != BATCH_DIM,
            f"dims.{name}",
            f"{name!r} is not a dimension name (and '{BATCH_DIM}' is the servers' own)",
        )
        need(
            all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)) and 1 <= low <= high <= MAX_DIM,
            f"dims.{name}",
            f"expected [min, max] with 1 <= min <= max <= {MAX_DIM}, got {list(sig.dims[name])}",
        )
    for side, specs in (("inputs", sig.inputs), ("outputs", sig.outputs)):
        need(1 <= len(specs) <= 64, side, f"expected 1 to 64 tensors, got {len(specs)}")
        names = [t.name for t in specs]
        need(len(set(names)) == len(names), side, f"names repeat: {sorted({n for n in names if names.count(n) > 1})}")
        for t in specs:
            where = f"{side}.{t.name}"
            need(isinstance(t.name, str) and bool(TENSOR_NAME.match(t.name)), where, f"{t.name!r} is not a tensor name")
            need(
                t.datatype in SIGNATURE_DATATYPES,
                where,
                f"datatype {t.datatype!r} is not one of {', '.join(SIGNATURE_DATATYPES)}",
            )
            need(
                1 <= len(t.shape) <= 8 and t.shape[0] == BATCH_DIM,
                where,
                f"a shape is '{BATCH_DIM}' then up to 7 dimensions, got {list(t.shape)}",
            )
            for d in t.shape[1:]:
                need(
                    (isinstance(d, int) and not isinstance(d, bool) and d >= 1) or d in sig.dims,
                    where,
                    f"dimension {d!r}: a positive integer or a name given a range in dims ({', '.join(sig.dims)})",
                )
            need(
                not t.range
                or (
                    len(t.range) == 2
                    and all(_is_number(v) and math.isfinite(v) for v in t.range)
                    and t.range[0] <= t.range[1]
                ),
                where,
                f"range must be [min, max] with min <= max, got {list(t.range)}",
            )
            need(side == "inputs" or (not t.range and t.pad is None), where, "range and pad are for inputs")
            need(
                t.pad is None or (_is_number(t.pad) and bool(t.dynamic)),
                where,
                "pad is a number, for an input with a named dimension after the batch",
            )
            need(
                not t.mask
                or (side == "inputs" and t.datatype in ("INT64", "INT32", "BOOL") and t.pad == 0 and bool(t.dynamic)),
                where,
                "a mask is an integer or boolean input with a named dimension, padded with 0",
            )
            need(
                t.pad is None or not t.range or t.range[0] <= t.pad <= t.range[1],
                where,
                f"pad {t.pad} lies outside the input's range {list(t.range)}",
            )
    used = {d for t in sig.inputs for d in t.dynamic}
    need(
        all(d in used for t in sig.outputs for d in t.dynamic),
        "outputs",
        "an output's named dimension must be one some input has (its length comes from the request)",
    )
    padded = {d for t in sig.inputs if t.pad is not None for d in t.dynamic}
    need(
        not padded or all(t.pad is not None for t in sig.inputs if set(t.dynamic) & padded),
        "inputs",
        "where one input is padded along a dimension, every input with that dimension needs a pad value",
    )


def _validate_single(card: ModelCard, need) -> None:
    """An image card's or a one-tensor card's fields."""
    shape = card.input_shape
    need(
        all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape),
        "input_shape",
        f"expected positive integers, got {list(shape)}",
    )
    if card.image:
        need(len(shape) == 3, "input_shape", f"an image input is C,H,W: three integers, got {list(shape)}")
        need(shape[0] in (1, 3), "input_shape", f"{shape[0]} channels: images have 1 (grey) or 3 (RGB)")
        need(
            all(4 <= v <= 4096 for v in shape[1:]), "input_shape", f"height and width must be 4..4096, got {shape[1:]}"
        )
        need(
            card.preprocess in IMAGE_RECIPES,
            "preprocess",
            f"{card.preprocess!r} is not one of {', '.join(IMAGE_RECIPES)}",
        )
    else:
        need(
            1 <= len(shape) <= 4 and math.prod(shape) <= MAX_TENSOR_ELEMENTS,
            "input_shape",
            f"a tensor input is 1 to 4 dimensions of at most {MAX_TENSOR_ELEMENTS} numbers, got {list(shape)}",
        )
        need(
            card.preprocess == TENSOR_RECIPE,
            "preprocess",
            f"tensor inputs are prepared by {TENSOR_RECIPE!r} (mean and std), not {card.preprocess!r}",
        )
        need(card.task != "reconstruct", "task", "reconstruction is for image models")
        need(
            not card.input_range or len(card.input_range) == shape[0],
            "input_range",
            f"one (min, max) per entry of the first axis ({shape[0]}), got {len(card.input_range)}",
        )
        need(
            all(
                isinstance(r, tuple)
                and len(r) == 2
                and all(_is_number(v) and math.isfinite(v) for v in r)
                and r[0] < r[1]
                for r in card.input_range
            ),
            "input_range",
            "each entry must be [min, max] with min < max",
        )
    for name in ("mean", "std"):
        values = getattr(card, name)
        what = "channel(s)" if card.image else "entries of the first axis"
        need(len(values) == shape[0], name, f"{len(values)} values for {shape[0]} {what}")
        need(all(math.isfinite(v) for v in values), name, f"must be finite, got {list(values)}")
    need(all(s > 0 for s in card.std), "std", f"must be positive, got {list(card.std)}")
    need(
        all(isinstance(x, str) and x.strip() and len(x) <= 200 for x in card.labels),
        "labels",
        "each label must be a non-empty string of at most 200 characters",
    )
    if card.task == "classify":
        need(len(card.labels) >= 1, "labels", "a classifier needs at least one label")
        dup = sorted({x for x in card.labels if card.labels.count(x) > 1})
        need(not dup, "labels", f"duplicate labels: {dup[:3]}")
    if card.task == "regress":
        need(not card.labels, "labels", "a regressor has output names, not labels")
        need(
            len(card.output_names) >= 1
            and all(isinstance(n, str) and n.strip() and len(n) <= 64 for n in card.output_names),
            "output_names",
            "a regressor needs one name (at most 64 characters) per output value",
        )
        need(
            not card.units or len(card.units) == len(card.output_names),
            "units",
            f"{len(card.units)} units for {len(card.output_names)} output values",
        )
        need(all(isinstance(u, str) and len(u) <= 32 for u in card.units), "units", "each unit is a short string")
    else:
        need(not card.output_names and not card.units, "output_names", "names and units are for regressors")
    need(
        card.preprocess not in GREY_RECIPES or shape[0] == 1,
        "preprocess",
        f"{card.preprocess!r} makes 1-channel images; the input has {shape[0]} channels (use resize or resize-crop)",
    )
    if card.resize is not None:
        need(
            card.image and isinstance(card.resize, int) and max(shape[1:]) <= card.resize <= 8192,
            "resize",
            f"the shorter side before the crop must be an integer from {max(shape[1:] or (0,))} to 8192, got "
            f"{card.resize!r}",
        )
    for name in ("input_name", "output_name"):
        value = getattr(card, name)
        need(isinstance(value, str) and bool(TENSOR_NAME.match(value)), name, f"{value!r} is not a tensor name")


def from_legacy(m: Mapping) -> ModelCard:
    """A checkpoint's or export's `meta` dict from before the card: same facts, checked the same way."""
    arch = m.get("arch")
    if arch not in BUILTIN_ARCHITECTURES:
        raise CardError("arch", f"{arch!r} is not a torchship architecture ({', '.join(BUILTIN_ARCHITECTURES)})")
    for key in ("preset", "input_shape", "mean", "std", "labels", "output_kind", "preprocess", "task"):
        if key not in m:
            raise CardError(key, "missing from the checkpoint's meta")
    versions = m.get("versions") or {}
    provenance = Provenance(
        source=m.get("checkpoint"),
        source_sha256=m.get("checkpoint_sha256"),
        epoch=m.get("checkpoint_epoch"),
        torch=versions.get("torch", m.get("torch_version")),
        onnx=versions.get("onnx"),
        onnxruntime=versions.get("onnxruntime"),
    )
    return ModelCard(
        name=m["preset"],
        task=m["task"],
        input_shape=m["input_shape"],
        mean=m["mean"],
        std=m["std"],
        labels=m["labels"],
        preprocess=m["preprocess"],
        output_kind=m["output_kind"],
        architecture=Architecture(BUILTIN_ARCHITECTURES[arch], dict(m.get("arch_kwargs") or {})),
        provenance=provenance,
        input_name=m.get("input_name", INPUT_NAMES["image"]),
        output_name=m.get("output_name", ""),
        dataset=m.get("dataset"),
        metrics=dict(m.get("metrics") or {}),
    )
