"""The model card: the one typed contract between training, export, serving and apps; stdlib only.

It ships inside every archive and beside every ONNX model, so it imports nothing of ours and no torch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

from .fields import CardError, is_number, sequence, sub
from .recipes import CROP_RATIO, NO_RECIPE, validate_single
from .signature import Signature, validate_signature

SCHEMA_VERSION = 5  # 2: tensor inputs and regression (input_kind, output_names, units, input_range); 3: version;
# 4: named inputs and outputs (signature); 5: detectors and segmenters (thresholds)
CARD_FILE = "meta.json"  # beside the model files of an export, and inside every archive
ONNX_METADATA_KEY = "torchship"  # ONNX metadata_props entry holding the card's JSON
TORCHSCRIPT_EXTRA_FILE = "meta.json"  # TorchScript extra file holding the card's JSON

TASKS = ("classify", "reconstruct", "regress", "tensors", "detect", "segment")  # tensors: every output answered by
# name, as computed; detect: boxes, scores and labels per image (model/vision.py); segment: a class per pixel
# An image file; a fixed-shape array of numbers per example (tensors.py); or several named tensors (signature.py).
INPUT_KINDS = ("image", "tensor", "named")
OUTPUT_KINDS = ("logits", "log-probabilities", "probabilities", "image", "values", "tensors", "detections")
OUTPUT_NAMES = {
    "logits": "logits",
    "log-probabilities": "log_probs",
    "probabilities": "probabilities",
    "image": "reconstruction",
    "values": "values",
    "detections": "boxes",
}
# A detector's thresholds, as the card records them and every format applies them (inside the exported graph)
THRESHOLD_KEYS = ("score", "iou", "detections")
INPUT_NAMES = {"image": "images", "tensor": "input"}
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
VERSION_PATTERN = re.compile(r"^[1-9][0-9]{0,17}$")  # Triton's: a positive integer, as text (URLs, gRPC, tritonclient)
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
class Architecture:
    """How to rebuild the eager model: `package.module:callable` or `path/file.py:Callable`, and its arguments."""

    spec: str
    kwargs: Mapping = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "spec", LEGACY_ARCHITECTURES.get(self.spec, self.spec))


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
    thresholds: Mapping = field(default_factory=dict)  # detect: score, iou (NMS) and detections (per image, at most)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        object.__setattr__(self, "input_shape", sequence("input_shape", self.input_shape))
        object.__setattr__(self, "mean", tuple(float(m) for m in _floats("mean", self.mean, self.channels)))
        object.__setattr__(self, "std", tuple(float(s) for s in _floats("std", self.std, self.channels)))
        object.__setattr__(self, "labels", sequence("labels", self.labels))
        for name in ("output_names", "units"):
            object.__setattr__(self, name, sequence(name, getattr(self, name)))
        object.__setattr__(
            self,
            "input_range",
            tuple(tuple(r) if isinstance(r, (list, tuple)) else r for r in sequence("input_range", self.input_range)),
        )
        if isinstance(self.signature, Mapping):
            object.__setattr__(self, "signature", sub(Signature, "signature", self.signature))
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
        d["thresholds"] = dict(self.thresholds)
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
        kw["architecture"] = sub(Architecture, "architecture", d["architecture"])
        kw["provenance"] = sub(Provenance, "provenance", d.get("provenance") or {})
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


def _floats(name: str, value, channels: int) -> tuple:
    if is_number(value):
        return (value,) * channels
    if not isinstance(value, (list, tuple)) or not all(is_number(v) for v in value):
        raise CardError(name, f"expected a list: one number, or one per channel; got {value!r}"[:200])
    if len(value) == 1:
        return tuple(value) * channels
    return tuple(value)


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
    need(
        (card.task == "detect") == (card.output_kind == "detections"),
        "output_kind",
        f"a {card.task} model cannot output {card.output_kind!r}",
    )
    need(card.task != "segment" or card.output_kind == "logits", "output_kind", "a segmenter outputs logits")
    need(isinstance(card.thresholds, Mapping), "thresholds", "expected an object")
    if card.task == "detect":
        t = card.thresholds
        need(
            sorted(t) == sorted(THRESHOLD_KEYS)
            and all(is_number(t[k]) for k in THRESHOLD_KEYS)
            and 0 <= t["score"] <= 1
            and 0 <= t["iou"] <= 1
            and isinstance(t["detections"], int)
            and 1 <= t["detections"] <= 1000,
            "thresholds",
            f"a detector records score and iou in [0, 1] and detections 1..1000, got {dict(t)}",
        )
    else:
        need(not card.thresholds, "thresholds", "thresholds are a detector's")
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
        validate_single(card, need)
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
