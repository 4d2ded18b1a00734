"""Turns one TorchServe request row into image bytes and options; no model code here.

Kept apart from model execution so another envelope (KServe v2, say) only needs its own decoder.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

import numpy as np

try:
    from handlers.preprocess import InputError
except ImportError:  # pragma: no cover - flat layout inside a TorchServe archive
    from preprocess import InputError

FILE_FIELDS = ("data", "body", "file", "image")  # raw body arrives as "body"; form files under their field name
DEFAULT_TOPK = 3


@dataclass
class Request:
    image: bytes
    topk: int = DEFAULT_TOPK


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


def b64(value: str | bytes) -> bytes:
    text = _text(value).strip()
    if text.startswith("data:") and "," in text:  # data URLs from browsers
        text = text.split(",", 1)[1]
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
    try:
        k = int(_text(raw))
    except ValueError:
        raise InputError(400, f"topk must be an integer, got {_text(raw)!r}") from None
    if not 1 <= k <= classes:
        raise InputError(400, f"topk must be between 1 and {classes}, got {k}")
    return k


def image_bytes(row: dict) -> bytes:
    """Raw bytes in the body, a multipart file, or JSON {"data": "<base64>"} (TorchServe has parsed the JSON)."""
    value = next((row[k] for k in FILE_FIELDS if row.get(k) is not None), None)
    if value is None:  # a multipart form with another field name: take its first bytes-valued field
        value = next((v for k, v in row.items() if k != "topk" and isinstance(v, (bytes, bytearray))), None)
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
        return data
    if value is None:
        raise InputError(400, "empty request: send image bytes, a multipart file or JSON {'data': base64}")
    raise InputError(400, f"unsupported request payload of type {type(value).__name__}")


def decode_row(row: dict, classes: int, topk_header: str | None = None) -> Request:
    return Request(image_bytes(row), topk_of(row, classes, topk_header))


@dataclass
class Batch:
    """What preprocess hands on: the good images stacked, and per row either its topk or its error."""

    inputs: np.ndarray | None
    rows: list[int] = field(default_factory=list)  # request index of each stacked image
    topk: list[int] = field(default_factory=list)
    errors: dict[int, InputError] = field(default_factory=dict)
    size: int = 0
