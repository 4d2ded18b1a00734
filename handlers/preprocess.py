"""Brings the images people send into the form the model was trained on; numpy and Pillow only.

Shared by the TorchServe handler, the ONNX embedding module and the load test, so all three see
exactly the same pixels.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

MAX_PIXELS = 16_000_000  # about 4000x4000; larger is refused before decoding (decompression bombs)
SIDE = 28
BOX = 20  # MNIST: the digit's bounding box is scaled to fit 20x20, aspect preserved


@dataclass
class InputError(Exception):
    """Bad client input: an HTTP status and a message that says what was wrong."""

    status: int
    message: str

    def __str__(self) -> str:
        return self.message


def decode(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Bytes of any format Pillow reads (PNG, JPEG, BMP, GIF, WebP, TIFF) to a fully loaded image."""
    if not data:
        raise InputError(400, "empty request body: send image bytes, a multipart file or JSON {'data': base64}")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise InputError(413, f"image too large: {e}") from None
    except Exception:
        raise InputError(415, f"not an image Pillow can read ({len(data)} bytes, starting {data[:8]!r})") from None
    w, h = img.size
    if w * h > max_pixels:
        raise InputError(413, f"image too large: {w}x{h} = {w * h} pixels, the limit is {max_pixels}")
    try:
        img.load()
    except Exception as e:
        raise InputError(400, f"truncated or corrupt {img.format} image: {e}") from None
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)  # animated GIF/WebP/TIFF: the first frame
    return img


def to_gray(img: Image.Image) -> np.ndarray:
    """Grayscale uint8; transparency is composited onto white paper first."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(paper, rgba)
    if img.mode in ("I;16", "I;16B", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        span = a.max() - a.min()
        return ((a - a.min()) / (span or 1) * 255).astype(np.uint8)
    return np.asarray(img if img.mode == "L" else img.convert("L"), dtype=np.uint8)


def light_background(gray: np.ndarray) -> bool:
    """Judged by the border, where paper shows and strokes rarely reach."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    return np.count_nonzero(border > 127) * 2 > border.size  # the border's median is light


def ink(gray: np.ndarray) -> np.ndarray:
    """Light strokes on black, as MNIST draws them; paper noise below a fifth of the ink's peak is dropped."""
    a = (255 - gray if light_background(gray) else gray).astype(np.float32)
    a -= np.median(a)  # paper that is grey, not white, becomes black
    np.clip(a, 0, None, out=a)
    peak = a.max()
    if peak > 0:
        a[a < 0.2 * peak] = 0
        a *= 255.0 / peak
    return a


def mnist_digit(gray: np.ndarray) -> np.ndarray:
    """MNIST's own recipe: crop to the ink, fit into 20x20 keeping aspect, centre of mass at the centre of 28x28."""
    if gray.shape == (SIDE, SIDE) and not light_background(gray):
        return gray.astype(np.float32) / 255.0  # already an MNIST-style digit: pass it through untouched
    a = ink(gray)
    rows, cols = np.flatnonzero(a.any(1)), np.flatnonzero(a.any(0))
    out = np.zeros((SIDE, SIDE), np.float32)
    if len(rows) == 0:
        return out  # a blank page stays blank
    crop = a[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = crop.shape
    scale = BOX / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = np.asarray(Image.fromarray(crop.astype(np.uint8)).resize((nw, nh), Image.Resampling.LANCZOS), np.float32)
    small = np.clip(small, 0, 255)
    total = small.sum()
    if total == 0:
        return out
    cy = (small.sum(1) * np.arange(nh)).sum() / total
    cx = (small.sum(0) * np.arange(nw)).sum() / total
    top = int(np.clip(round(SIDE / 2 - cy - 0.5), 0, SIDE - nh))
    left = int(np.clip(round(SIDE / 2 - cx - 0.5), 0, SIDE - nw))
    out[top : top + nh, left : left + nw] = small
    return out / 255.0


def fashion(gray: np.ndarray) -> np.ndarray:
    """FashionMNIST: light objects on black, plainly resized to 28x28."""
    a = 255 - gray if light_background(gray) else gray
    if a.shape != (SIDE, SIDE):
        a = np.asarray(Image.fromarray(a.astype(np.uint8)).resize((SIDE, SIDE), Image.Resampling.LANCZOS))
    return a.astype(np.float32) / 255.0


MODES = {"mnist-digit": mnist_digit, "fashion": fashion}

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Ancillary chunks Pillow does not apply to the pixels; any other (tRNS, eXIf, PLTE...) takes the general path.
INERT_CHUNKS = frozenset((b"tEXt", b"zTXt", b"iTXt", b"pHYs", b"tIME", b"gAMA", b"cHRM", b"sRGB"))


def side_png(data: bytes) -> np.ndarray | None:
    """A 28x28 8-bit grey PNG (what MNIST tools write) decoded by Pillow's zlib decoder alone; None for anything else.

    Skipping Pillow's Python-level plugin machinery takes most of the decode off a lone request,
    where this 2-core machine runs everything cache-cold (bench/NOTES.md).
    """
    if not data.startswith(PNG_SIGNATURE):
        return None
    pos, n, idat, header = 8, len(data), [], False
    while pos + 12 <= n:
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if end > n or zlib.crc32(data[pos + 4 : end - 4]) != struct.unpack_from(">I", data, end - 4)[0]:
            return None  # truncated or corrupt: the general path says what is wrong
        if kind == b"IHDR":
            header = data[pos + 8 : end - 4] == struct.pack(">IIBBBBB", SIDE, SIDE, 8, 0, 0, 0, 0)
            if not header:
                return None
        elif kind == b"IDAT":
            idat.append(data[pos + 8 : end - 4])
        elif kind == b"IEND":
            break
        elif kind not in INERT_CHUNKS:
            return None
        pos = end
    else:
        return None
    if not header or not idat:
        return None
    try:
        img = Image.frombytes("L", (SIDE, SIDE), b"".join(idat), "zip", "L")
        return np.frombuffer(img.tobytes(), np.uint8).reshape(SIDE, SIDE)
    except (ValueError, OSError):
        return None


def normaliser(mean: float, std: float) -> np.ndarray:
    """uint8 pixel -> model input, computed exactly as prepare() computes it, as a 256-entry table."""
    return ((np.arange(256, dtype=np.uint8).astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


def fast_prepare(data: bytes, mode: str, table: np.ndarray) -> np.ndarray | None:
    """The common request, an MNIST-style 28x28 grey PNG, to the same (1, 28, 28) array prepare() makes; else None."""
    gray = side_png(data)
    if gray is None:
        return None
    if light_background(gray):
        if mode != "fashion":
            return None  # dark ink on paper: the general path crops, scales and centres it
        gray = 255 - gray
    return table[gray][None]


def prepare_bytes(data: bytes, mode: str, mean: float, std: float, table: np.ndarray, max_pixels: int = MAX_PIXELS):
    """Request bytes to the model's (1, 28, 28) input: the fast path when it applies, Pillow with every check else."""
    x = fast_prepare(data, mode, table)
    return x if x is not None else prepare(decode(data, max_pixels), mode, mean, std)


def as_image(item) -> Image.Image:
    """Anything an app may hold: a path, bytes, a PIL image or a numpy array (uint8, or float in [0, 1])."""
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, (bytes, bytearray, memoryview)):
        return decode(bytes(item))
    if isinstance(item, np.ndarray):
        a = item
        if a.dtype != np.uint8:
            a = (np.clip(a.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
        return Image.fromarray(a.squeeze())
    with open(item, "rb") as f:  # str or os.PathLike
        return decode(f.read())


def prepare(img: Image.Image, mode: str, mean: float, std: float) -> np.ndarray:
    """One image to a normalised (1, 28, 28) float32 array."""
    if "exif" in img.info or img.format == "TIFF":  # phone photos carry their rotation in EXIF
        img = ImageOps.exif_transpose(img) or img
    pixels = MODES[mode](to_gray(img))
    return ((pixels - mean) / std).astype(np.float32)[None]


def to_png(image: np.ndarray, mean: float, std: float) -> bytes:
    """A model output image (normalised, (1, 28, 28)) back to PNG bytes."""
    pixels = np.clip(image.reshape(SIDE, SIDE) * std + mean, 0, 1)
    buf = io.BytesIO()
    Image.fromarray((pixels * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def softmax(scores: np.ndarray) -> np.ndarray:
    """Probabilities from logits or log-probabilities alike (softmax of log p is p)."""
    z = scores - scores.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_k(probs: np.ndarray, labels: list[str], k: int = 3) -> dict:
    """The response body of one classification: label, its probability and the top-k."""
    k = max(1, min(k, len(labels)))
    p = probs.tolist()  # plain floats: ten of them are cheaper to sort in Python than through numpy
    order = sorted(range(len(p)), key=p.__getitem__, reverse=True)[:k]
    return {
        "label": labels[order[0]],
        "probability": round(p[order[0]], 6),
        "topk": [{"label": labels[i], "probability": round(p[i], 6)} for i in order],
    }
