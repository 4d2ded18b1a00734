"""The Open Inference Protocol's gRPC messages (`inference.GRPCInferenceService`, kserve's generated definitions) and
tensors to and from them: a ModelInferRequest's inputs as v2 tensors, and the outputs as a ModelInferResponse."""

from __future__ import annotations

import functools
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np

from . import v2

SERVICE = "inference.GRPCInferenceService"
KSERVE_PROTO_MODULE = "kserve.protocol.grpc.grpc_predict_v2_pb2"


@functools.cache
def messages():
    """kserve's generated messages for the standard service, loaded from their one file: importing the kserve package
    itself takes ~6 s here (pandas, FastAPI) and brings nothing this server uses. Registered under kserve's own module
    name, so a later `import kserve` reuses it instead of defining package `inference` twice."""
    if KSERVE_PROTO_MODULE in sys.modules:  # kserve itself was imported first (its adapter, in the same process)
        return sys.modules[KSERVE_PROTO_MODULE]
    found = importlib.util.find_spec("kserve")
    path = Path(found.origin).parent / "protocol" / "grpc" / "grpc_predict_v2_pb2.py" if found else None
    if path is None or not path.is_file():
        raise RuntimeError(
            "the Open Inference Protocol's gRPC messages come from kserve's definitions: "
            "pip install 'kserve>=0.21,<0.22'"
        )
    spec = importlib.util.spec_from_file_location(KSERVE_PROTO_MODULE, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[KSERVE_PROTO_MODULE] = module
    return module


TYPED_CONTENTS = {  # the protocol's InferTensorContents field for each datatype (the narrow ints ride in 32 bits)
    "BYTES": "bytes_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "INT64": "int64_contents",
    "INT32": "int_contents",
    "INT16": "int_contents",
    "INT8": "int_contents",
    "UINT64": "uint64_contents",
    "UINT32": "uint_contents",
    "UINT16": "uint_contents",
    "UINT8": "uint_contents",
    "BOOL": "bool_contents",
}


def plain(parameters) -> dict:
    """A protobuf parameters map (InferParameter's one-of) as plain values."""
    return {
        key: getattr(p, p.WhichOneof("parameter_choice"))
        for key, p in parameters.items()
        if p.WhichOneof("parameter_choice")
    }


RAW_INPUT_CONTENTS = 7  # ModelInferRequest's field number (tests/unit/test_v2_grpc.py checks it against the proto)
VIEWS_FROM = 64 * 1024  # a message this large has its raw contents taken as views (bench/NOTES.md, lever 75)


class WithViews:
    """A ModelInferRequest whose raw_input_contents are read-only views of the message it came in: upb parsed only
    the rest, where it would have copied each tensor twice (into the message, then out as `bytes`)."""

    __slots__ = ("message", "raw_input_contents", "size")

    def __init__(self, message, raw: list[memoryview], size: int):
        self.message, self.raw_input_contents, self.size = message, raw, size

    def __getattr__(self, name: str):
        return getattr(self.message, name)

    def ByteSize(self) -> int:  # noqa: N802 (protobuf's name)
        return self.size


def _read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    """A varint at POS and where it ends; (-1, pos) if it is not one."""
    value, shift = 0, 0
    while pos < len(view) and shift < 64:
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    return -1, pos


def split_raw(data) -> tuple[bytes, list[memoryview]] | None:
    """A serialized ModelInferRequest as the message without its raw_input_contents, and those as views of DATA in
    order; None where its top level is not plain protobuf (then upb's own parse says what is wrong)."""
    view = memoryview(data).toreadonly()
    rest, raw, kept, pos, n = [], [], 0, 0, len(view)
    while pos < n:
        start = pos
        tag, pos = _read_varint(view, pos)
        wire = tag & 7
        if tag < 0 or wire not in (0, 1, 2, 5):
            return None
        if wire == 0:
            value, pos = _read_varint(view, pos)
            if value < 0:
                return None
        elif wire == 2:
            length, pos = _read_varint(view, pos)
            if length < 0 or pos + length > n:
                return None
            if tag >> 3 == RAW_INPUT_CONTENTS:
                raw.append(view[pos : pos + length])
                rest.append(view[kept:start])
                kept = pos + length
            pos += length
        else:
            pos += 8 if wire == 1 else 4
        if pos > n:
            return None
    rest.append(view[kept:n])
    return b"".join(rest), raw


def tensors_of(request, limit=None, shm=None) -> list[v2.Tensor]:
    """A ModelInferRequest's inputs: raw contents (tritonclient's default), typed contents, or a shared memory region
    (SHM: oip/shm.Regions); `limit` (model_io.element_limit) bounds each tensor's elements before any is read."""
    raw = list(request.raw_input_contents)
    regions = [v2.shared_memory(plain(inp.parameters), f"input '{inp.name[:64]}'") for inp in request.inputs]
    carried = sum(r is None for r in regions)  # raw contents come for the inputs not in shared memory, in order
    if raw and len(raw) != carried:
        raise v2.ProtocolError(f"{len(raw)} raw_input_contents for {carried} inputs sent in the request")
    out = []
    for inp, region in zip(request.inputs, regions):
        name, shape, datatype = inp.name[:64], tuple(int(d) for d in inp.shape[:17]), inp.datatype[:16]
        if len(shape) > 16 or any(d < 0 for d in shape):
            raise v2.ProtocolError(f"input '{name}': shape must be at most 16 non-negative integers")
        most = limit(datatype) if limit else None
        if most is not None and math.prod(shape) > most:
            raise v2.too_many(name, shape, math.prod(shape), most)
        if region is not None:
            out.append(v2.tensor_from_binary(name, datatype, shape, v2.read_region(shm, region, name), most))
            continue
        if raw:
            chunk = raw.pop(0)
            chunk = bytes(chunk) if datatype == "BYTES" else chunk  # its elements are decoded as bytes
            out.append(v2.tensor_from_binary(name, datatype, shape, chunk, most))
            continue
        if datatype not in TYPED_CONTENTS:
            raise v2.ProtocolError(
                f"input '{name}': datatype {datatype} is not one this model takes as typed "
                "contents (send raw_input_contents)"
            )
        contents = getattr(inp.contents, TYPED_CONTENTS[datatype])
        if most is not None and len(contents) > most:
            raise v2.too_many(name, shape, len(contents), most)
        data = (
            np.array(list(contents), dtype=object)
            if datatype == "BYTES"
            else np.asarray(contents, v2.DATATYPES[datatype])
        )
        out.append(v2.Tensor(name, datatype, shape, data))
    return out


def infer_response(name: str, version: str, request, outputs: list[v2.Tensor], labels: dict | None = None, shm=None):
    """Outputs as raw contents, the form every client reads (typed contents reach tritonclient as empty arrays); an
    output asked for with the `classification` parameter as its top classes (v2.classify); one asked for in a shared
    memory region (SHM: oip/shm.Regions) written there, named in the answer, its raw contents empty."""
    params = {o.name: plain(o.parameters) for o in request.outputs}
    asked = {n: p.get("classification", 0) for n, p in params.items()}
    unknown = [n for n in asked if n not in {t.name for t in outputs}]
    if unknown:
        raise v2.ProtocolError(f"unknown output {unknown[0][:64]!r}: this model has {[t.name for t in outputs]}")
    chosen = [t for t in outputs if not asked or t.name in asked]
    chosen = [v2.classify(t, asked[t.name], (labels or {}).get(t.name)) if asked.get(t.name) else t for t in chosen]
    response = messages().ModelInferResponse(model_name=name, model_version=version, id=request.id)
    for t in chosen:
        out = response.outputs.add(name=t.name, datatype=t.datatype, shape=list(t.shape))
        blob = v2.raw_bytes(t)
        region = v2.shared_memory(params.get(t.name), f"output '{t.name}'")
        if region is not None:
            if shm is None:
                raise v2.ProtocolError(f"output '{t.name}': this server writes no tensors to shared memory")
            shm.write(region[0], region[2], blob, region[1], f"output '{t.name}'")
            out.parameters["shared_memory_region"].string_param = region[0]
            out.parameters["shared_memory_byte_size"].int64_param = len(blob)
            blob = b""
        response.raw_output_contents.append(blob)
    return response


def stream_response(infer_response=None, *, error: str = "", request_id: str = "") -> bytes:
    """Triton's ModelStreamInferResponse (error_message = 1, infer_response = 2), written as protobuf's wire format
    by hand: kserve's definitions have no streaming messages, and a message of one pool cannot hold another's. An
    error carries the request's id in an otherwise empty infer_response, as Triton's does."""
    if infer_response is None:
        infer_response = messages().ModelInferResponse(id=request_id)
    out = b""
    if error:
        text = error.encode()
        out += b"\x0a" + _varint(len(text)) + text
    body = infer_response.SerializeToString()
    return out + b"\x12" + _varint(len(body)) + body


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)
