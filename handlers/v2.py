"""The Open Inference Protocol (KServe v2) as torchship models speak it: which tensors go in and come out.

Neutral numpy tensors, so the KServe model (kserve's own request objects) and the TorchServe handler
(JSON or the binary extension it parses itself) share one implementation; numpy and Pillow only.
Inputs: `images`, BYTES [N], each element an encoded image file; or `input`, FP32 [N, C, H, W], already
normalised. Outputs: `probabilities` FP32 [N, classes] and `label` BYTES [N] for classifiers,
`reconstruction` FP32 [N, C, H, W] for the autoencoder.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass

import numpy as np

from .card import ModelCard
from .images import InputError, Preprocessor
from .responses import probabilities

IMAGES, ARRAY = "images", "input"
PROBABILITIES, LABEL, RECONSTRUCTION = "probabilities", "label", "reconstruction"
MAX_BATCH = 256  # images in one request; a larger batch is the client's to split
HEADER_LENGTH = "inference-header-content-length"  # the binary tensor extension's header


class ProtocolError(ValueError):
    """A request the protocol or the model cannot take: always the client's (400), with what and where."""


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray  # BYTES: an object array of bytes


def input_types(card: ModelCard) -> list[dict]:
    return [
        {"name": IMAGES, "datatype": "BYTES", "shape": [-1]},
        {"name": ARRAY, "datatype": "FP32", "shape": [-1, *card.input_shape]},
    ]


def output_types(card: ModelCard) -> list[dict]:
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


def model_inputs(card: ModelCard, preprocessor: Preprocessor, tensors: list[Tensor]) -> np.ndarray:
    """The one input tensor of a request to the model's normalised (N, C, H, W) batch, or a ProtocolError."""
    names = [t.name for t in tensors]
    if len(tensors) != 1 or names[0] not in (IMAGES, ARRAY):
        shape = ", ".join(map(str, card.input_shape))
        raise ProtocolError(f"send one input, named '{IMAGES}' (BYTES [N], image files) or '{ARRAY}' "
                            f"(FP32 [N, {shape}], normalised); got {names}")  # fmt: skip
    t = tensors[0]
    n = int(np.prod(t.shape)) if t.shape else 0
    if not 1 <= (t.shape[0] if t.shape else 0) <= MAX_BATCH:
        raise ProtocolError(f"input '{t.name}': batch size {t.shape[0] if t.shape else 0} out of 1..{MAX_BATCH}")
    if t.name == IMAGES:
        if t.datatype != "BYTES":
            raise ProtocolError(
                f"input '{IMAGES}' must be BYTES (one encoded image file per element), not {t.datatype}"
            )
        if len(t.shape) != 1 and not (len(t.shape) == 2 and t.shape[1] == 1):
            raise ProtocolError(f"input '{IMAGES}' must have shape [N] (or [N, 1]), got {list(t.shape)}")
        values = list(np.asarray(t.data, dtype=object).reshape(-1))
        if len(values) != n:
            raise ProtocolError(f"input '{IMAGES}' holds {len(values)} elements for shape {list(t.shape)}")
        arrays = []
        for i, value in enumerate(values):
            try:
                arrays.append(preprocessor.from_bytes(element_bytes(value, i)))
            except InputError as e:
                raise ProtocolError(f"input '{IMAGES}' element {i}: {e.message}") from None
        return np.stack(arrays)
    if t.datatype != "FP32":
        raise ProtocolError(f"input '{ARRAY}' must be FP32, not {t.datatype}")
    want = (t.shape[0], *card.input_shape) if t.shape else ()
    if tuple(t.shape) != want:
        raise ProtocolError(f"input '{ARRAY}' must have shape [N, {', '.join(map(str, card.input_shape))}], "
                            f"got {list(t.shape)}")  # fmt: skip
    x = np.asarray(t.data, dtype=np.float32)
    if x.size != n:
        raise ProtocolError(f"input '{ARRAY}' holds {x.size} values for shape {list(t.shape)}")
    x = x.reshape(want)
    if not np.isfinite(x).all():
        raise ProtocolError(f"input '{ARRAY}' holds NaN or infinite values")
    return np.ascontiguousarray(x)


def model_outputs(card: ModelCard, raw: np.ndarray) -> list[Tensor]:
    if card.task == "reconstruct":
        out = np.asarray(raw, np.float32).reshape(len(raw), *card.input_shape)
        return [Tensor(RECONSTRUCTION, "FP32", out.shape, out)]
    probs = probabilities(card, raw)
    labels = np.array([card.labels[i].encode() for i in probs.argmax(1)], dtype=object)
    return [Tensor(PROBABILITIES, "FP32", probs.shape, probs), Tensor(LABEL, "BYTES", labels.shape, labels)]


# The wire format over HTTP, for a server that parses requests itself (TorchServe hands us the raw body).

DATATYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32, "UINT8": np.uint8}


def bytes_elements(blob: bytes) -> list[bytes]:
    """The binary extension's BYTES layout: each element a 4-byte little-endian length, then the bytes."""
    out, pos = [], 0
    while pos < len(blob):
        if pos + 4 > len(blob):
            raise ProtocolError("BYTES tensor data is truncated")
        (size,) = struct.unpack_from("<I", blob, pos)
        if pos + 4 + size > len(blob):
            raise ProtocolError("BYTES tensor data is truncated")
        out.append(blob[pos + 4 : pos + 4 + size])
        pos += 4 + size
    return out


def parse_http(body, header_length: int | None = None) -> tuple[dict, list[Tensor]]:
    """A v2 infer request body (JSON, or JSON + binary tensors) to its header and input tensors."""
    if isinstance(body, dict):
        header, binary = body, b""
    else:
        raw = bytes(body or b"")
        cut = len(raw) if header_length is None else header_length
        if not 0 < cut <= len(raw):
            raise ProtocolError(f"{HEADER_LENGTH} {header_length} does not fit a {len(raw)}-byte body")
        try:
            header = json.loads(raw[:cut])
        except ValueError:
            raise ProtocolError("the request is not v2 JSON (and no binary header length was given)") from None
        binary = raw[cut:]
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise ProtocolError("a v2 request is a JSON object with an 'inputs' list")
    tensors, pos = [], 0
    for k, spec in enumerate(header["inputs"]):
        if not isinstance(spec, dict) or not {"name", "datatype", "shape"} <= set(spec):
            raise ProtocolError(f"input {k} needs 'name', 'datatype' and 'shape'")
        name, datatype, shape = str(spec["name"]), str(spec["datatype"]), spec["shape"]
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ProtocolError(f"input '{name}': shape must be a list of non-negative integers")
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            chunk, pos = binary[pos : pos + int(size)], pos + int(size)
            if len(chunk) != int(size):
                raise ProtocolError(f"input '{name}': binary data is shorter than its binary_data_size {size}")
            if datatype == "BYTES":
                data = np.array(bytes_elements(chunk), dtype=object)
            elif datatype in DATATYPES:
                data = np.frombuffer(chunk, DATATYPES[datatype])
            else:
                raise ProtocolError(f"input '{name}': datatype {datatype} is not one this model takes")
        else:
            values = spec.get("data")
            if values is None:
                raise ProtocolError(f"input '{name}' has neither 'data' nor binary_data_size")
            if datatype == "BYTES":
                data = np.array(list(np.asarray(values, dtype=object).reshape(-1)), dtype=object)
            elif datatype in DATATYPES:
                try:
                    data = np.asarray(values, dtype=DATATYPES[datatype]).reshape(-1)
                except (TypeError, ValueError):
                    raise ProtocolError(f"input '{name}': data is not a list of {datatype} numbers") from None
            else:
                raise ProtocolError(f"input '{name}': datatype {datatype} is not one this model takes")
        tensors.append(Tensor(name, datatype, tuple(shape), data))
    return header, tensors


def response_json(model: str, request: dict, outputs: list[Tensor]) -> dict:
    """A v2 infer response in plain JSON (BYTES as UTF-8 strings): what a TorchServe handler can return."""
    out = []
    for t in outputs:
        data = [x.decode() for x in t.data.reshape(-1)] if t.datatype == "BYTES" else t.data.reshape(-1).tolist()
        out.append({"name": t.name, "datatype": t.datatype, "shape": list(t.shape), "data": data})
    return {"model_name": model, "id": str(request.get("id", "")), "outputs": out}
