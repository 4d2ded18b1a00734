"""The Open Inference Protocol (KServe v2) on the wire: tensors over HTTP as JSON, or JSON followed by binary tensors
(the binary tensor extension), and BYTES elements as gRPC's raw contents carry them; numpy only. Which tensors a
torchship model takes and gives is protocol/model_io.py's.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..model.errors import InputError
from ..model.named import NUMPY

try:  # orjson parses and writes the JSON of every request 3-10x faster than json (bench/NOTES.md, OIP)
    import orjson
except ImportError:  # pragma: no cover - the standard library does the same, slower
    orjson = None

HEADER_LENGTH = "inference-header-content-length"  # the binary tensor extension's header


class ProtocolError(InputError, ValueError):
    """A request the protocol or the model cannot take: always the client's (4xx), with what and where."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(status, message)


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray  # BYTES: an object array of bytes


@dataclass(frozen=True)
class Wanted:
    """An output a request asks for, whether it wants it as binary data after the JSON, whether as its top
    classes (Triton's classification extension: that many, else 0), and whether in a shared memory region."""

    name: str
    binary: bool
    classification: int = 0
    shm: tuple[str, int, int] | None = None  # (region, byte size, offset)


# every datatype of the protocol but BYTES (whose elements have lengths) and BF16 (numpy has none): the ones no
# signature names yet (torch computes on no unsigned type wider than 8 bits) still parse, then get a 400 naming them
DATATYPES = {**NUMPY, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64}


def too_many(name: str, shape, count: int, most: int) -> ProtocolError:
    return ProtocolError(
        f"input '{name}': shape {list(shape)[:8]} holds {count} elements; at most {most} per request", 413
    )


def bytes_elements(blob: bytes, most: int | None = None) -> list[bytes]:
    """The binary extension's BYTES layout (gRPC's raw contents too): each element a 4-byte little-endian length,
    then the bytes. Reading stops one element past `most`: enough to say there are too many."""
    out, pos, n = [], 0, len(blob)
    stop = len(blob) if most is None else most + 1
    while pos < n and len(out) < stop:
        if pos + 4 > n:
            raise ProtocolError("BYTES tensor data is truncated")
        (size,) = struct.unpack_from("<I", blob, pos)
        if pos + 4 + size > n:
            raise ProtocolError("BYTES tensor data is truncated: an element's length runs past its data")
        out.append(blob[pos + 4 : pos + 4 + size])
        pos += 4 + size
    return out


def raw_bytes(t: Tensor) -> bytes:
    """A tensor as the binary extension, gRPC's raw contents and shared memory all carry it."""
    return bytes_blob(t.data.reshape(-1)) if t.datatype == "BYTES" else np.ascontiguousarray(t.data).tobytes()


def bytes_blob(elements) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def tensor_from_binary(
    name: str, datatype: str, shape: tuple[int, ...], chunk: bytes, most: int | None = None
) -> Tensor:
    if datatype == "BYTES":
        elements = bytes_elements(chunk, most)
        if most is not None and len(elements) > most:
            raise ProtocolError(
                f"input '{name}' holds more than {most} elements for shape {list(shape)[:8]}; at most "
                f"{most} per request",
                413,
            )
        return Tensor(name, datatype, shape, np.array(elements or [], dtype=object))
    if datatype not in DATATYPES:
        raise ProtocolError(f"input '{name}': datatype {datatype} is not one this model takes")
    size = np.dtype(DATATYPES[datatype]).itemsize
    if len(chunk) % size:
        raise ProtocolError(f"input '{name}': {len(chunk)} bytes of data are not a whole number of {datatype} values")
    return Tensor(name, datatype, shape, np.frombuffer(chunk, DATATYPES[datatype]))


def loads(raw: bytes):
    """JSON of a request: a ProtocolError for anything that is not (nesting thousands deep, NaN, Infinity)."""
    try:
        return orjson.loads(raw) if orjson else json.loads(raw)
    except (ValueError, RecursionError, TypeError) as e:
        hint = "; NaN and Infinity are not JSON numbers" if b"NaN" in raw or b"Infinity" in raw else ""
        raise ProtocolError(f"the request is not valid JSON ({str(e).splitlines()[0][:120]}){hint}") from None


def parse_http(
    body, header_length: int | None = None, limit: Callable[[str], int] | None = None, shm=None
) -> tuple[dict, list[Tensor]]:
    """A v2 infer request body (JSON, or JSON + binary tensors) to its header and input tensors; `limit` (from
    element_limit) bounds every tensor's elements before any is read; SHM (oip/shm.Regions) reads an input a client
    put in a registered shared memory region."""
    if isinstance(body, dict):
        header, binary = body, b""
    else:
        raw = bytes(body or b"")
        cut = len(raw) if header_length is None else header_length
        if not 0 < cut <= len(raw):
            raise ProtocolError(f"{HEADER_LENGTH} {header_length} does not fit a {len(raw)}-byte body")
        header, binary = loads(raw[:cut]), memoryview(raw)[cut:]
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise ProtocolError("a v2 request is a JSON object with an 'inputs' list")
    tensors, pos = [], 0
    for k, spec in enumerate(header["inputs"]):
        if not isinstance(spec, dict) or not {"name", "datatype", "shape"} <= set(spec):
            raise ProtocolError(f"input {k} needs 'name', 'datatype' and 'shape'")
        name, datatype, shape = str(spec["name"])[:64], str(spec["datatype"])[:16], spec["shape"]
        if (
            not isinstance(shape, list)
            or len(shape) > 16
            or not all(isinstance(d, int) and 0 <= d <= 1 << 31 for d in shape)
        ):
            raise ProtocolError(f"input '{name}': shape must be a list of at most 16 non-negative integers")
        most = limit(datatype) if limit else None
        if most is not None and math.prod(shape) > most:
            raise too_many(name, shape, math.prod(shape), most)
        params = spec.get("parameters") or {}
        region = shared_memory(params, f"input '{name}'")
        if region is not None:
            tensors.append(tensor_from_binary(name, datatype, tuple(shape), read_region(shm, region, name), most))
            continue
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0:
                raise ProtocolError(f"input '{name}': binary_data_size must be a non-negative integer")
            chunk, pos = bytes(binary[pos : pos + size]), pos + size
            if len(chunk) != size:
                raise ProtocolError(f"input '{name}': binary_data_size {size} runs past the end of the body")
            tensors.append(tensor_from_binary(name, datatype, tuple(shape), chunk, most))
            continue
        values = spec.get("data")
        if values is None:
            raise ProtocolError(f"input '{name}' has neither 'data' nor binary_data_size")
        if datatype == "BYTES":
            data = np.array(list(_flat(values, name, most)), dtype=object)
        elif datatype in DATATYPES:
            claimed = _first_path_size(values)
            if most is not None and claimed > most:
                raise too_many(name, shape, claimed, most)
            try:
                data = np.asarray(values, dtype=DATATYPES[datatype]).reshape(-1)
            except (TypeError, ValueError, OverflowError):
                raise ProtocolError(f"input '{name}': data is not a list of {datatype} numbers") from None
        else:
            raise ProtocolError(f"input '{name}': datatype {datatype} is not one this model takes")
        tensors.append(Tensor(name, datatype, tuple(shape), data))
    if pos != len(binary):
        raise ProtocolError(f"{len(binary) - pos} bytes of binary data follow the tensors they belong to")
    return header, tensors


def shared_memory(params, what: str) -> tuple[str, int, int] | None:
    """A tensor's shared memory parameters (Triton's): (region, byte size, offset), or None for a tensor sent as it
    is; a region without its size is an error."""
    if not isinstance(params, dict) or "shared_memory_region" not in params:
        return None
    region, size, offset = (
        params.get(k) for k in ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
    )
    if not isinstance(region, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ProtocolError(f"{what}: shared_memory_region needs shared_memory_byte_size, a number of bytes")
    offset = 0 if offset is None else offset
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise ProtocolError(f"{what}: shared_memory_offset must be a non-negative integer")
    return region, size, offset


def read_region(shm, region: tuple[str, int, int], name: str) -> bytes:
    if shm is None:
        raise ProtocolError(
            f"input '{name}': this server takes no tensors in shared memory (start it with --allow_client_shm)"
        )
    return shm.read(region[0], region[2], region[1], f"input '{name}'")


def _flat(values, name: str, most: int | None = None):
    """A BYTES tensor's JSON data, nested or flat, element by element; one past `most` is an error."""
    count, stack = 0, [iter([values])]
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                if len(stack) > 8:
                    raise ProtocolError(f"input '{name}': data is nested deeper than any tensor this model takes")
                stack.append(iter(v))
                break
            count += 1
            if most is not None and count > most:
                raise ProtocolError(f"input '{name}' holds more than {most} elements; at most {most} per request", 413)
            yield v
        else:
            stack.pop()


def _first_path_size(values) -> int:
    """The elements a nested JSON list holds if it is rectangular: the product of its lengths along the first path
    (a ragged list fails numpy's conversion instead)."""
    size = 1
    while isinstance(values, list):
        size *= len(values)
        values = values[0] if values else None
    return size


def wanted(header: dict, names: list[str]) -> list[Wanted]:
    """The outputs a request asks for (all of NAMES, when it names none), each as JSON or as binary data."""
    params = header.get("parameters") if isinstance(header.get("parameters"), dict) else {}
    default_binary = params.get("binary_data_output") is True
    asked = header.get("outputs")
    if asked is None:
        return [Wanted(n, default_binary) for n in names]
    if not isinstance(asked, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in asked):
        raise ProtocolError("'outputs' must be a list of objects with a 'name'")
    out = []
    for o in asked:
        if o["name"] not in names:
            raise ProtocolError(f"unknown output {o['name'][:64]!r}: this model has {names}")
        p = o.get("parameters") if isinstance(o.get("parameters"), dict) else {}
        k = p.get("classification", 0)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ProtocolError(
                f"output '{o['name'][:64]}': classification must be a positive integer, got {k!r}"[:200]
            )
        region = shared_memory(p, f"output '{o['name'][:64]}'")
        out.append(Wanted(o["name"], p.get("binary_data", default_binary) is True, k, region))
    return out


def classify(t: Tensor, k: int, labels=None) -> Tensor:
    """Triton's classification extension: each row's K highest values, highest first, as BYTES [N, K] of
    "value:index" (":label" after, where the model has labels)."""
    if t.datatype == "BYTES" or not t.shape:
        raise ProtocolError(
            f"output '{t.name}' is {t.datatype} {list(t.shape)}: classification takes a batch of numbers"
        )
    scores = np.asarray(t.data, np.float64).reshape(t.shape[0], -1)
    if not 1 <= k <= scores.shape[1]:
        raise ProtocolError(f"output '{t.name}': classification {k} is outside 1..{scores.shape[1]}")
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    named = (lambda i: f":{labels[i]}") if labels else (lambda i: "")  # noqa: E731
    rows = [[f"{scores[r, i]:f}:{i}{named(i)}".encode() for i in row] for r, row in enumerate(order.tolist())]
    data = np.empty((len(rows), k), dtype=object)
    data[:] = rows
    return Tensor(t.name, "BYTES", (len(rows), k), data)


def json_values(x: np.ndarray):
    """An array as JSON's nested lists, BYTES elements as UTF-8 text (what is not UTF-8 shows as U+FFFD: ask for
    the output as binary to get its bytes)."""
    if isinstance(x, (bytes, bytearray, np.bytes_)):  # one element of a BYTES row
        return bytes(x).decode("utf-8", "replace")
    x = np.asarray(x)
    if x.dtype != object:
        return x.tolist()
    return np.vectorize(lambda b: bytes(b).decode("utf-8", "replace"), otypes=[object])(x).tolist() if x.size else []


def _json_data(t: Tensor) -> list:
    return json_values(t.data.reshape(-1))


def response_json(model: str, request: dict, outputs: list[Tensor]) -> dict:
    """A v2 infer response in plain JSON (BYTES as UTF-8 strings): what a TorchServe handler can return."""
    out = [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape), "data": _json_data(t)} for t in outputs]
    return {"model_name": model, "id": str(request.get("id", "")), "outputs": out}


def response_http(
    model: str,
    request: dict,
    outputs: list[Tensor],
    want: list[Wanted],
    version: str | None = None,
    labels: dict | None = None,
    shm=None,
) -> tuple[bytes, int | None]:
    """A v2 infer response body, and the JSON header's length when binary tensors follow it (else None). LABELS:
    output name -> the class names a classification of it reports; SHM (oip/shm.Regions) takes an output a request
    asked for in a shared memory region, which the answer then leaves out (as Triton does)."""
    by_name = {t.name: t for t in outputs}
    specs, blobs = [], []
    for w in want:
        t = by_name[w.name]
        if w.classification:
            t = classify(t, w.classification, (labels or {}).get(t.name))
        spec = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        if w.shm is not None:
            region, size, offset = w.shm
            blob = raw_bytes(t)
            if shm is None:
                raise ProtocolError(f"output '{t.name}': this server writes no tensors to shared memory")
            shm.write(region, offset, blob, size, f"output '{t.name}'")  # named only: Triton's C++ client reads
            # an output's parameters as binary_data_size and fails without it
        elif w.binary:
            blob = raw_bytes(t)
            spec["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            spec["data"] = _json_data(t)
        specs.append(spec)
    header = {"model_name": model, "outputs": specs}
    if version:
        header["model_version"] = version
    if "id" in request:
        header["id"] = str(request["id"])[:256]
    text = orjson.dumps(header) if orjson else json.dumps(header).encode()
    return (text + b"".join(blobs), len(text)) if blobs else (text, None)
