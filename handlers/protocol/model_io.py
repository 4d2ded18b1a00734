"""A torchship model in the Open Inference Protocol: the tensors its card takes and gives (its metadata), a request's
input tensors to the model's batch, and the model's rows to output tensors; numpy and Pillow only. Images: `images`,
BYTES [N], each element an encoded image file; or `input`, FP32 [N, C, H, W], already normalised. Tensor models:
`input`, FP32 [N, *shape] of raw numbers. Named-input models: their signature's tensors. Outputs: `probabilities`
FP32 [N, classes] and `label` BYTES [N] for classifiers, `reconstruction` FP32 [N, C, H, W] for the autoencoder, the
card's output name for a regressor, the signature's outputs by name; a detector's and a segmenter's in
model/vision.py (detection_tensors, segment_tensors), in the sent images' pixels.

One implementation for the OIP server (REST and gRPC), the kserve.Model adapter and the TorchServe handler.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Callable

import numpy as np

from ..card import ModelCard
from ..limits import MAX_BATCH_ITEMS
from ..model import named, vision
from ..model.errors import InputError
from ..model.images import Preprocessor, framed, sizes_of
from ..model.steps import StepError, Steps
from ..model.tensors import rows_from_array, standardize
from .v2 import ProtocolError, Tensor

IMAGES, ARRAY = "images", "input"
PROBABILITIES, LABEL, RECONSTRUCTION = "probabilities", "label", "reconstruction"


def input_types(card: ModelCard, images: bool = True) -> list[dict]:
    """Shapes as Triton states them, the batch first: an image is one BYTES element per row ([N, 1]; [N] is taken
    too), which is how perf_analyzer and Triton's model configuration count it. IMAGES False: an image model takes
    its FP32 input alone (a server started with triton_images, for Triton's image clients)."""
    if card.named:
        return named.types(card.signature.served_inputs)
    array = {"name": ARRAY, "datatype": "FP32", "shape": [-1, *card.input_shape]}
    return [{"name": IMAGES, "datatype": "BYTES", "shape": [-1, 1]}, array] if card.image and images else [array]


def output_types(card: ModelCard, label: bool = True) -> list[dict]:
    """LABEL False: a classifier answers its probabilities alone (triton_images)."""
    return [t for t in _output_types(card) if label or t["name"] != LABEL]


def _output_types(card: ModelCard) -> list[dict]:
    if card.named:
        return named.types(card.signature.served_outputs)
    if card.task == "detect":
        k = card.thresholds["detections"]
        return [
            {"name": "boxes", "datatype": "FP32", "shape": [-1, k, 4]},
            {"name": "scores", "datatype": "FP32", "shape": [-1, k]},
            {"name": "labels", "datatype": "INT32", "shape": [-1, k]},
            {"name": "names", "datatype": "BYTES", "shape": [-1, k]},
            {"name": "count", "datatype": "INT32", "shape": [-1]},
        ]
    if card.task == "segment":
        return [
            {"name": "mask", "datatype": "UINT8", "shape": [-1, -1, -1]},
            {"name": "counts", "datatype": "INT32", "shape": [-1, card.classes]},
        ]
    if card.task == "regress":
        return [{"name": card.output_name, "datatype": "FP32", "shape": [-1, card.outputs]}]
    if card.task == "reconstruct":
        return [{"name": RECONSTRUCTION, "datatype": "FP32", "shape": [-1, *card.input_shape]}]
    return [
        {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, card.classes]},
        {"name": LABEL, "datatype": "BYTES", "shape": [-1]},
    ]


def element_bytes(value, i: int) -> bytes:
    """A BYTES element: raw bytes (the binary extension, gRPC), or a base64 string (JSON)."""
    if isinstance(value, (bytes, bytearray, np.bytes_)):
        return bytes(value)
    if isinstance(value, str):
        text = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError(
                f"input '{IMAGES}' element {i}: a JSON string must be the image file in base64"
            ) from None
    raise ProtocolError(
        f"input '{IMAGES}' element {i}: expected the bytes of an image file, got {type(value).__name__}"
    )


def model_inputs(
    card: ModelCard,
    preprocessor: Preprocessor,
    tensors: list[Tensor],
    images: bool = True,
    steps: Steps | None = None,
) -> np.ndarray:
    """The one input tensor of a request to the model's normalised (N, C, H, W) batch, or a ProtocolError. IMAGES
    False: an image model takes its FP32 input alone (input_types). STEPS: a named-input model's own step, loaded
    (model/steps.load)."""
    names = [t.name for t in tensors]
    if card.named:
        return _named_inputs(card, tensors, steps)
    if not card.image:
        return _tensor_inputs(card, tensors)
    if not images and names != [ARRAY]:
        shape = ", ".join(map(str, card.input_shape))
        raise ProtocolError(
            f"send one input, named '{ARRAY}' (FP32 [N, {shape}], normalised, NCHW): this server takes "
            f"{card.name}'s images that way only (started with triton_images); got {names}"
        )
    if len(tensors) != 1 or names[0] not in (IMAGES, ARRAY):
        shape = ", ".join(map(str, card.input_shape))
        raise ProtocolError(
            f"send one input, named '{IMAGES}' (BYTES [N], image files) or '{ARRAY}' "
            f"(FP32 [N, {shape}], normalised); got {names}"
        )
    t = tensors[0]
    n = math.prod(t.shape) if t.shape else 0
    if not 1 <= (t.shape[0] if t.shape else 0) <= MAX_BATCH_ITEMS:
        raise ProtocolError(f"input '{t.name}': batch size {t.shape[0] if t.shape else 0} out of 1..{MAX_BATCH_ITEMS}")
    if t.name == IMAGES:
        if t.datatype != "BYTES":
            raise ProtocolError(
                f"input '{IMAGES}' must be BYTES (one encoded image file per element), not {t.datatype}"
            )
        if len(t.shape) != 1 and not (len(t.shape) == 2 and t.shape[1] == 1):
            raise ProtocolError(f"input '{IMAGES}' must have shape [N] (or [N, 1]), got {list(t.shape)}")
        values = t.data.tolist() if t.data.ndim == 1 else list(np.asarray(t.data, dtype=object).reshape(-1))
        if len(values) != n:
            raise ProtocolError(f"input '{IMAGES}' holds {len(values)} elements for shape {list(t.shape)}")
        arrays = []
        for i, value in enumerate(values):
            try:
                arrays.append(preprocessor.from_bytes(element_bytes(value, i)))
            except InputError as e:  # the image's own status: 413 too large, 415 not an image, 422 blank
                raise ProtocolError(f"input '{IMAGES}' element {i}: {e.message}", e.status) from None
            except MemoryError:
                raise ProtocolError(f"input '{IMAGES}' element {i}: image too large to process", 413) from None
            except Exception as e:  # an image Pillow opened but could not convert: still the client's
                raise ProtocolError(
                    f"input '{IMAGES}' element {i}: could not process the image: {str(e)[:200]}", 422
                ) from None
        batch = framed(arrays)
        if card.task == "segment" and len(set(sizes_of(batch))) > 1:
            raise ProtocolError(
                f"input '{IMAGES}': images of different sizes ({', '.join(f'{w}x{h}' for h, w in sizes_of(batch))}) "
                "cannot share one mask tensor: send them in separate requests"
            )
        return batch
    if t.datatype != "FP32":
        raise ProtocolError(f"input '{ARRAY}' must be FP32, not {t.datatype}")
    want = (t.shape[0], *card.input_shape) if t.shape else ()
    if tuple(t.shape) != want:
        raise ProtocolError(
            f"input '{ARRAY}' must have shape [N, {', '.join(map(str, card.input_shape))}], got {list(t.shape)}"
        )
    try:
        x = np.asarray(t.data, dtype=np.float32)
    except (TypeError, ValueError):
        raise ProtocolError(f"input '{ARRAY}': data is not a list of FP32 numbers") from None
    if x.size != n:
        raise ProtocolError(f"input '{ARRAY}' holds {x.size} values for shape {list(t.shape)}")
    x = x.reshape(want)
    if not np.isfinite(x).all():
        raise ProtocolError(f"input '{ARRAY}' holds NaN or infinite values")
    return np.ascontiguousarray(x)


def _tensor_inputs(card: ModelCard, tensors: list[Tensor]) -> np.ndarray:
    """A tensor model's one input: FP32 [N, *shape] of raw numbers, standardized as the card says."""
    shape = ", ".join(map(str, card.input_shape))
    if len(tensors) != 1 or tensors[0].name != ARRAY:
        raise ProtocolError(f"send one input, named '{ARRAY}' (FP32 [N, {shape}]); got {[t.name for t in tensors]}")
    t = tensors[0]
    if t.datatype != "FP32":
        raise ProtocolError(f"input '{ARRAY}' must be FP32, not {t.datatype}")
    if len(t.shape) != len(card.input_shape) + 1 or tuple(t.shape[1:]) != tuple(card.input_shape):
        raise ProtocolError(f"input '{ARRAY}' must have shape [N, {shape}], got {list(t.shape)}")
    n = math.prod(t.shape)
    if np.asarray(t.data).size != n:
        raise ProtocolError(f"input '{ARRAY}' holds {np.asarray(t.data).size} values for shape {list(t.shape)}")
    try:
        rows = rows_from_array(card, np.asarray(t.data, np.float32).reshape(t.shape), f"input '{ARRAY}'")
    except InputError as e:
        raise ProtocolError(e.message, e.status) from None
    return standardize(card, rows)


def _named_inputs(card: ModelCard, tensors: list[Tensor], steps: Steps | None) -> named.Rows:
    """Every input the signature names, checked: names, datatypes, shapes, dimension ranges and values."""
    given = {}
    for t in tensors:
        if t.name in given:
            raise ProtocolError(f"input '{t.name}' is sent twice")
        given[t.name] = (t.datatype, tuple(t.shape), t.data)
    try:
        return _steps(card, steps).check(given)
    except named.SignatureError as e:
        raise ProtocolError(e.message, e.status) from None


def _steps(card: ModelCard, steps: Steps | None) -> Steps:
    if steps is None and card.signature.process:
        raise StepError(f"{card.name}'s own step ({card.signature.process.file}) is not loaded")
    return steps or Steps(card.signature)


def model_outputs(card: ModelCard, rows, steps: Steps | None = None, inputs: named.Rows | None = None) -> list[Tensor]:
    """A request's v2 output tensors from its rows of responses.batch_outputs (a classifier's probabilities). INPUTS:
    a named-input request's own rows, which a model's own step may read (a text's tokens)."""
    if card.named:
        out = _steps(card, steps).outputs(rows, inputs)
        return [Tensor(t.name, t.datatype, out[t.name].shape, out[t.name]) for t in card.signature.served_outputs]
    if card.task in ("detect", "segment"):
        sizes = sizes_of(inputs) if inputs is not None else (tuple(card.input_shape[1:]),) * len(rows)
        out = (vision.detection_tensors if card.task == "detect" else vision.segment_tensors)(card, rows, sizes)
        return [Tensor(t["name"], t["datatype"], out[t["name"]].shape, out[t["name"]]) for t in _output_types(card)]
    if card.task == "regress":
        out = np.asarray(rows, np.float32).reshape(len(rows), card.outputs)
        return [Tensor(card.output_name, "FP32", out.shape, out)]
    if card.task == "reconstruct":
        out = np.asarray(rows, np.float32).reshape(len(rows), *card.input_shape)
        return [Tensor(RECONSTRUCTION, "FP32", out.shape, out)]
    probs = np.asarray(rows, np.float32).reshape(len(rows), -1)
    labels = np.array([card.labels[i].encode() for i in probs.argmax(1)], dtype=object)
    return [Tensor(PROBABILITIES, "FP32", probs.shape, probs), Tensor(LABEL, "BYTES", labels.shape, labels)]


def element_limit(card: ModelCard) -> Callable[[str], int]:
    """The most elements one request's tensor of a datatype may hold for this model: checked from the shape a client
    claims before any element is read, and again while reading."""
    per_request = named.element_limit(card.signature) if card.named else MAX_BATCH_ITEMS * math.prod(card.input_shape)
    return lambda datatype: MAX_BATCH_ITEMS if datatype == "BYTES" and not card.named else per_request


def output_names(card: ModelCard, label: bool = True) -> list[str]:
    return [t["name"] for t in output_types(card, label)]


def output_labels(card: ModelCard) -> dict[str, tuple[str, ...]]:
    """The class names a classification of an output reports (Triton's classification extension): a classifier's
    probabilities are its labels'."""
    return {PROBABILITIES: card.labels} if not card.named and card.task == "classify" else {}
