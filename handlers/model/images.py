"""Brings the images people send into the form the model was trained on; numpy and Pillow only.

One implementation for the TorchServe handler, the KServe model, the ONNX embedding and the load
test, so all of them see exactly the same pixels. Each recipe in the card's `preprocess` field:
- mnist-digit: light background detected and inverted, cropped to the ink, fitted into 20/28 of the
  side keeping its aspect, centred by centre of mass (MNIST's own recipe);
- fashion: light background inverted, plainly resized (FashionMNIST);
- resize: straight to H x W;
- resize-crop: shorter side to `card.resize`, centre crop to H x W (torchvision's classification preset);
- letterbox: fitted into H x W keeping its aspect, at the top left, the rest black; the batch remembers each image's
  own size (Framed), so a detector's boxes and a segmenter's mask are answered in the sent image's pixels.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps

from ..card import ModelCard
from ..recipes import FRAMED_RECIPE, GREY_RECIPES
from .errors import InputError

# Only these decoders ever see request bytes: Pillow's other plugins (EPS runs Ghostscript) are never tried.
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
MAX_PIXELS = 4_194_304  # 2048 x 2048: decoding stays ~0.1 s and ~16 MB; more is refused before decoding
WORKING_SIDE = 1024  # digit recipes crop to the ink at this resolution at most (integer box reduce first)
BLANK_CONTRAST = 16  # grey levels between darkest and lightest below which a digit image holds nothing
DIGIT_BOX = 20 / 28  # MNIST: the digit's bounding box fills 20 of 28 pixels


def default_max_pixels(card: ModelCard) -> int:
    """Enough for a phone photo of the subject; a model with a larger input gets room for four of its inputs."""
    if not card.image:
        return MAX_PIXELS
    return max(MAX_PIXELS, 4 * card.input_shape[1] * card.input_shape[2])


def decode(data: bytes, max_pixels: int = MAX_PIXELS, draft: tuple[int, int] | None = None) -> Image.Image:
    """Bytes of an accepted format to a loaded image, doing the least work the format allows.

    `draft` lets JPEG decode at 1/2, 1/4 or 1/8 scale while staying at least that size; the pixel cap is
    checked on the size the decoder will produce, before any pixel is decoded.
    """
    if not data:
        raise InputError(400, "empty image: send the image file's bytes, a multipart file or JSON {'data': base64}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own cap below is tighter
            img = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as e:
        raise InputError(413, f"image too large: {e}") from None
    except Exception:
        raise InputError(
            415,
            f"not an image in an accepted format ({', '.join(FORMATS)}); got {len(data)} bytes starting {data[:8]!r}",
        ) from None
    if draft is not None and img.format in ("JPEG", "MPO"):
        img.draft("RGB" if img.mode == "RGB" else img.mode, draft)
    w, h = img.size
    if w * h > max_pixels:
        raise InputError(413, f"image too large: {w}x{h} = {w * h} pixels, the limit is {max_pixels}")
    try:
        img.load()
    except Exception as e:
        raise InputError(400, f"truncated or corrupt {img.format} image: {e}") from None
    if "exif" in img.info or img.format == "TIFF":  # phone photos carry their rotation in EXIF
        try:
            img = ImageOps.exif_transpose(img) or img
        except Exception:  # a damaged EXIF block is no reason to refuse the picture
            pass
    return img


def flat(img: Image.Image, channels: int) -> Image.Image:
    """8-bit grey ("L") or RGB; transparency composited onto white paper, 16-bit stretched to 8."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) * (255.0 / ((hi - lo) or 1.0))
        img = Image.fromarray(a.round().astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    mode = "L" if channels == 1 else "RGB"
    return img if img.mode == mode else img.convert(mode)


def flatten(img: Image.Image, channels: int) -> np.ndarray:
    """uint8 (H, W) grey or (H, W, 3) RGB: flat()'s pixels."""
    return np.asarray(flat(img, channels), dtype=np.uint8)


def light_background(gray: np.ndarray) -> bool:
    """Judged by the border, where paper shows and strokes rarely reach."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    return np.count_nonzero(border > 127) * 2 > border.size  # the border's median is light


def blank(gray: np.ndarray) -> bool:
    return int(gray.max()) - int(gray.min()) < BLANK_CONTRAST


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


def mnist_digit(gray: np.ndarray, height: int = 28, width: int = 28) -> np.ndarray:
    """MNIST's own recipe: crop to the ink, fit into 20/28 of the side keeping aspect, centre of mass at the centre."""
    if gray.shape == (height, width) and not light_background(gray):
        return gray.astype(np.float32) / 255.0  # already an MNIST-style digit: pass it through untouched
    out = np.zeros((height, width), np.float32)
    a = ink(gray)
    rows, cols = np.flatnonzero(a.any(1)), np.flatnonzero(a.any(0))
    if len(rows) == 0:
        return out
    crop = a[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = crop.shape
    scale = round(DIGIT_BOX * min(height, width)) / max(h, w)
    nh, nw = min(height, max(1, round(h * scale))), min(width, max(1, round(w * scale)))
    small = np.asarray(Image.fromarray(crop.astype(np.uint8)).resize((nw, nh), Image.Resampling.LANCZOS), np.float32)
    total = small.sum()
    if total == 0:
        return out
    cy = (small.sum(1) * np.arange(nh)).sum() / total
    cx = (small.sum(0) * np.arange(nw)).sum() / total
    top = int(np.clip(round(height / 2 - cy - 0.5), 0, height - nh))
    left = int(np.clip(round(width / 2 - cx - 0.5), 0, width - nw))
    out[top : top + nh, left : left + nw] = small
    return out / 255.0


def fashion(gray: np.ndarray, height: int = 28, width: int = 28) -> np.ndarray:
    """FashionMNIST: light objects on black, plainly resized."""
    a = 255 - gray if light_background(gray) else gray
    if a.shape != (height, width):
        a = np.asarray(Image.fromarray(a.astype(np.uint8)).resize((width, height), Image.Resampling.LANCZOS))
    return a.astype(np.float32) / 255.0


def resize(img: Image.Image, height: int, width: int) -> np.ndarray:
    """Straight to H x W, bilinear with antialiasing (torchvision's Resize((H, W)) on a PIL image)."""
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(img)


def resize_crop(img: Image.Image, height: int, width: int, short: int) -> np.ndarray:
    """Shorter side to `short`, then the centre H x W: torchvision's Resize(short) + CenterCrop((H, W))."""
    w, h = img.size
    if (h <= w and h != short) or (w < h and w != short):
        nh, nw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
        h, w = nh, nw
    pixels = np.asarray(img)
    if h < height or w < width:  # torchvision pads a crop larger than the image with zeros
        pad = np.zeros((max(h, height), max(w, width), *pixels.shape[2:]), np.uint8)
        top, left = (pad.shape[0] - h) // 2, (pad.shape[1] - w) // 2
        pad[top : top + h, left : left + w] = pixels
        pixels, h, w = pad, pad.shape[0], pad.shape[1]
    top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    return pixels[top : top + height, left : left + width]


def letterbox(img: Image.Image, height: int, width: int) -> np.ndarray:
    """Fitted into H x W keeping its aspect (bilinear), for placing at the top left on black: undone by fitted_size."""
    w, h = img.size
    nh, nw = fitted_size(h, w, height, width)
    return np.asarray(img if (nh, nw) == (h, w) else img.resize((nw, nh), Image.Resampling.BILINEAR))


def fitted_size(h: int, w: int, height: int, width: int) -> tuple[int, int]:
    """Where an h x w image lies inside the letterbox: its top-left nh x nw."""
    scale = min(height / h, width / w)
    return min(height, max(1, round(h * scale))), min(width, max(1, round(w * scale)))


class Framed(np.ndarray):
    """A letterboxed batch that remembers each image's own (height, width); a plain array is at the model's size."""

    sizes: tuple = ()


def framed(arrays: list[np.ndarray]) -> np.ndarray:
    """One batch of (C, H, W) or (N, C, H, W) arrays, each Framed one's sizes kept in order."""
    batch = np.stack(arrays) if arrays[0].ndim == 3 else np.concatenate(arrays)
    if not any(isinstance(a, Framed) for a in arrays):
        return batch
    return with_sizes(batch, tuple(s for a in arrays for s in sizes_of(a, 1 if a.ndim == 3 else len(a))))


def with_sizes(x: np.ndarray, sizes) -> Framed:
    """X (no copy) as a Framed batch of images of these own sizes."""
    out = x.view(Framed)
    out.sizes = tuple(sizes)
    return out


def sizes_of(x: np.ndarray, n: int | None = None) -> tuple[tuple[int, int], ...]:
    """Each image's own (height, width): a Framed batch's, else the model's input size for all N."""
    found = getattr(x, "sizes", ())
    n = len(x) if n is None else n
    return tuple(found) if len(found) == n else (tuple(x.shape[-2:]),) * n


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Ancillary chunks Pillow does not apply to the pixels; any other (tRNS, eXIf, PLTE...) takes the general path.
INERT_CHUNKS = frozenset((b"tEXt", b"zTXt", b"iTXt", b"pHYs", b"tIME", b"gAMA", b"cHRM", b"sRGB"))


def grey_png(data: bytes, height: int, width: int) -> np.ndarray | None:
    """An 8-bit grey PNG of exactly H x W (what MNIST tools write) decoded by Pillow's zlib decoder alone; else None.

    Skipping Pillow's Python-level plugin machinery takes most of the decode off a lone request,
    where a 2-core machine runs everything cache-cold (bench/NOTES.md, lever 18).
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
            header = data[pos + 8 : end - 4] == struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
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
        img = Image.frombytes("L", (width, height), b"".join(idat), "zip", "L")
        return np.frombuffer(img.tobytes(), np.uint8).reshape(height, width)
    except (ValueError, OSError):
        return None


def scale(plane: np.ndarray, into: np.ndarray, mean: float, std: float) -> np.ndarray:
    """uint8 pixels of one channel -> the model's input, in float32 as normalise() computes it: the one arithmetic
    behind both the tables and a photo's pass."""
    np.divide(plane, np.float32(255.0), out=into, dtype=np.float32)
    into -= np.float32(mean)
    into /= np.float32(std)
    return into


def normaliser(mean: float, std: float) -> np.ndarray:
    """uint8 pixel -> model input for one channel, as a table."""
    return scale(np.arange(256, dtype=np.uint8), np.empty(256, np.float32), mean, std)


@dataclass(frozen=True)
class Preprocessor:
    """A card's recipe, ready to run: what every runtime builds once at start-up."""

    card: ModelCard
    max_pixels: int = 0  # 0: default_max_pixels(card)
    tables: tuple[np.ndarray, ...] = field(default=(), repr=False)

    def __post_init__(self):
        if not self.max_pixels:
            object.__setattr__(self, "max_pixels", default_max_pixels(self.card))
        tables = tuple(normaliser(m, s) for m, s in zip(self.card.mean, self.card.std))
        object.__setattr__(self, "tables", tables)

    @property
    def draft(self) -> tuple[int, int] | None:
        """The size a JPEG may be decoded down to and still hold everything the recipe needs; None: its own size (a
        letterboxed image's answer is in the pixels it was sent with)."""
        c = self.card
        if c.preprocess == FRAMED_RECIPE:
            return None
        if c.preprocess in GREY_RECIPES:
            return (WORKING_SIDE // 2, WORKING_SIDE // 2)
        side = c.resize if c.preprocess == "resize-crop" else max(c.input_shape[1:])
        return (side, side)

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """Floats in [0, 1], (H, W) or (H, W, C), to the model's normalised (C, H, W) float32."""
        x = pixels[..., None] if pixels.ndim == 2 else pixels
        mean = np.asarray(self.card.mean, np.float32)
        std = np.asarray(self.card.std, np.float32)
        return np.ascontiguousarray(((x - mean) / std).astype(np.float32).transpose(2, 0, 1))

    def scaled(self, pixels: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 (H, W) or (H, W, C) to the normalised (C, H, W) float32 (into `out`) by the tables' own arithmetic,
        one pass a channel: 5x faster than indexing the tables for a photo (bench/NOTES.md, lever 81)."""
        planes = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        out = np.empty(planes.shape, np.float32) if out is None else out
        for plane, into, mean, std in zip(planes, out, self.card.mean, self.card.std):
            scale(plane, into, mean, std)
        return out

    def from_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """A flattened uint8 image (see flatten) through the card's recipe."""
        c = self.card
        _, height, width = c.input_shape
        if c.preprocess not in GREY_RECIPES:
            return self.from_flat(Image.fromarray(pixels))
        if blank(pixels):
            raise InputError(422, f"the image is blank (one uniform shade): there is nothing for {c.name} to recognise")
        recipe = mnist_digit if c.preprocess == "mnist-digit" else fashion
        return self.normalise(recipe(pixels, height, width))

    def from_flat(self, img: Image.Image) -> np.ndarray:
        """A flat() picture through a photo recipe, resized as a PIL image and normalised in one pass."""
        c = self.card
        _, height, width = c.input_shape
        if c.preprocess == "resize":
            return self.scaled(resize(img, height, width))
        if c.preprocess != FRAMED_RECIPE:
            return self.scaled(resize_crop(img, height, width, c.resize))
        pixels = letterbox(img, height, width)
        nh, nw = pixels.shape[:2]
        out = np.empty((c.channels, height, width), np.float32)
        black = np.array([t[0] for t in self.tables[: c.channels]], np.float32)[:, None, None]  # a black pixel's input
        out[:, nh:], out[:, :nh, nw:] = black, black
        self.scaled(pixels, out[:, :nh, :nw])
        return with_sizes(out, ((img.size[1], img.size[0]),))

    def from_image(self, img: Image.Image) -> np.ndarray:
        if self.card.preprocess not in GREY_RECIPES:
            return self.from_flat(flat(img, self.card.channels))
        pixels = flatten(img, self.card.channels)
        if max(pixels.shape[:2]) > WORKING_SIDE:
            factor = -(-max(pixels.shape[:2]) // WORKING_SIDE)  # box filter, integer factor: cheap, enough to find ink
            pixels = np.asarray(Image.fromarray(pixels).reduce(factor))
        return self.from_pixels(pixels)

    def fast(self, data: bytes) -> np.ndarray | None:
        """The common digit request, an MNIST-style grey PNG of the model's size, straight to the input; else None."""
        c = self.card
        if c.preprocess not in GREY_RECIPES:
            return None
        gray = grey_png(data, c.input_shape[1], c.input_shape[2])
        if gray is None or blank(gray):
            return None
        if light_background(gray):
            if c.preprocess != "fashion":
                return None  # dark ink on paper: the general path crops, scales and centres it
            gray = 255 - gray
        return self.tables[0][gray][None]

    def from_bytes(self, data: bytes) -> np.ndarray:
        """Request bytes to the model's (C, H, W) input: the fast path when it applies, Pillow with every check else."""
        x = self.fast(data)
        return x if x is not None else self.from_image(decode(data, self.max_pixels, self.draft))

    def from_item(self, item) -> np.ndarray:
        """Anything an app may hold: a path, bytes, a PIL image or a numpy array (uint8, or float in [0, 1])."""
        if isinstance(item, (bytes, bytearray, memoryview)):
            return self.from_bytes(bytes(item))
        if isinstance(item, Image.Image):
            return self.from_image(item)
        if isinstance(item, np.ndarray):
            a = item
            if a.dtype != np.uint8:
                a = (np.clip(a.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
            a = a.squeeze()
            if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
                a = a.transpose(1, 2, 0)  # (C, H, W) as torch holds images
            if a.ndim not in (2, 3):
                raise InputError(400, f"an image array must be (H, W), (H, W, C) or (C, H, W), got {item.shape}")
            return self.from_image(Image.fromarray(a))
        with open(item, "rb") as f:  # str or os.PathLike
            return self.from_bytes(f.read())
