"""Turns one TorchServe request row into image bytes and options; no model code here.

Kept apart from model execution so another envelope (KServe v2, say) only needs its own decoder.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

import numpy as np

from ..model.errors import InputError
from ..model.responses import DEFAULT_TOPK

FILE_FIELDS = ("data", "body", "file", "image")  # raw body arrives as "body"; form files under their field name
OPTION_FIELDS = ("topk",)
HOW_TO_SEND = (
    "send the image file's bytes (curl -T digit.png, or --data-binary @digit.png -H 'Content-Type: image/png'), "
    'a multipart file (curl -F data=@digit.png) or JSON {"data": "<base64>"}'
)


@dataclass
class Request:
    image: bytes
    topk: int = DEFAULT_TOPK


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


def shown(value, limit: int = 40) -> str:
    """A client's value quoted back in an error, never longer than `limit` characters."""
    text = _text(value)
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def b64(value) -> bytes:
    if not isinstance(value, (str, bytes, bytearray)):
        got = "null" if value is None else type(value).__name__
        raise InputError(400, f"'data' must be a base64 string holding the image file, got {got}")
    text = _text(value).strip()
    if text.startswith("data:") and "," in text:  # data URLs from browsers
        text = text.split(",", 1)[1]
    if not text:
        raise InputError(400, "'data' is an empty string: it must hold the base64-encoded image file")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(400, "'data' is not valid base64") from None


def topk_of(row: dict, classes: int, header: str | None = None) -> int:
    """From a form field or JSON key `topk`, else the X-TopK header, else the default."""
    body = row.get("body")
    raw = row.get("topk", body.get("topk") if isinstance(body, dict) else None)
    raw = header if raw is None else raw
    if raw is None:
        return min(DEFAULT_TOPK, classes)
    if isinstance(raw, bool) or not isinstance(raw, (int, str, bytes, bytearray)):
        raise InputError(400, f"topk must be an integer, got {shown(raw)}")
    try:
        k = int(_text(raw).strip()) if len(_text(raw)) <= 12 else None
    except ValueError:
        k = None
    if k is None:
        raise InputError(400, f"topk must be an integer, got {shown(raw)}")
    if not 1 <= k <= classes:
        raise InputError(400, f"topk must be between 1 and {classes}, got {shown(k)}")
    return k


def image_bytes(row: dict) -> bytes:
    """Raw bytes in the body, a multipart file, or JSON {"data": "<base64>"} (TorchServe has parsed the JSON)."""
    files = [k for k, v in row.items() if k not in OPTION_FIELDS and isinstance(v, (bytes, bytearray)) and v]
    if len(files) > 1:
        raise InputError(
            400,
            f"send one image per request; this one holds {len(files)} files "
            f"({', '.join(shown(f, 20) for f in files[:4])})",
        )
    value = next((row[k] for k in FILE_FIELDS if k in row), None)
    if value is None and files:  # a multipart form with another field name
        value = row[files[0]]
    if isinstance(value, dict):
        if "data" not in value:
            raise InputError(400, "JSON body needs a 'data' field holding the base64-encoded image")
        return b64(value["data"])
    if isinstance(value, list):
        raise InputError(400, "send one image per request; TorchServe batches requests itself")
    if isinstance(value, str):  # text/plain or a form field: base64
        return b64(value)
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
        if data.lstrip()[:1] in (b"{", b"["):  # TorchServe forwards JSON it could not parse as bytes
            raise InputError(400, 'body looks like JSON but does not parse: send {"data": "<base64>"}')
        if not data:
            raise InputError(400, f"empty request body: {HOW_TO_SEND}")
        return data
    if value is None:
        raise InputError(400, f"empty request: {HOW_TO_SEND}")
    raise InputError(400, f"unsupported request payload of type {type(value).__name__}: {HOW_TO_SEND}")


FORM_ENCODED = "application/x-www-form-urlencoded"


def decode_row(row: dict, classes: int, topk_header: str | None = None, content_type: str | None = None) -> Request:
    if content_type and content_type.split(";")[0].strip().lower() == FORM_ENCODED:
        raise InputError(
            400,
            f"the body was sent as a URL-encoded form (what curl -d sends), which mangles binary data: {HOW_TO_SEND}",
        )
    return Request(image_bytes(row), topk_of(row, classes, topk_header))


@dataclass
class Batch:
    """A TorchServe batch on its way through the handler: every good request's images stacked in one array, and
    per request either where its images sit, or its error."""

    size: int
    inputs: np.ndarray | None = None
    parts: list[Part] = field(default_factory=list)  # one per good request, in order
    errors: dict[int, InputError] = field(default_factory=dict)
    outputs: np.ndarray | None = None  # raw model output for `inputs`, set by inference


@dataclass
class Part:
    """One good request's images within the batch: rows [start, stop) of its inputs and outputs."""

    index: int  # which request of TorchServe's batch
    start: int
    stop: int
    topk: int = DEFAULT_TOPK
    v2: dict | None = None  # the request's v2 JSON header, when it came in through the Open Inference Protocol
    v1: bool = False  # rows sent as {"instances": [...]}: answered as {"predictions": [...]}
    named: bool = False  # one example's named inputs, {"inputs": {...}}: answered as {"outputs": {...}}
