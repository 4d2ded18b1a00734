"""Preprocessing on synthetic dark-on-white digits of varied size, position, colour and transparency."""

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from handlers import preprocess
from handlers.preprocess import InputError
from serve.samples import held_out_digits


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def paper(digit: np.ndarray, size: int, box: int, top: int, left: int) -> np.ndarray:
    """A digit drawn in dark ink on white paper, `box` pixels tall, at (top, left) of a size x size page."""
    big = np.asarray(Image.fromarray(digit).resize((box, box), Image.Resampling.BICUBIC))
    page = np.zeros((size, size), np.uint8)
    page[top : top + box, left : left + box] = big
    return 255 - page


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def center_of_mass(a: np.ndarray) -> tuple[float, float]:
    ys, xs = np.indices(a.shape)
    return float((ys * a).sum() / a.sum()), float((xs * a).sum() / a.sum())


DIGITS, LABELS = held_out_digits()


@pytest.mark.parametrize(
    "size,box,top,left",
    [(60, 40, 10, 5), (200, 60, 130, 20), (400, 300, 50, 90), (90, 28, 0, 62), (1000, 500, 480, 480)],
)
def test_dark_digit_on_white_paper_becomes_its_mnist_form(size, box, top, left):
    sims = []
    for i in range(0, 1000, 37):
        out = preprocess.mnist_digit(paper(DIGITS[i], size, box, top, left))
        assert out.shape == (28, 28) and 0 <= out.min() and out.max() <= 1
        sims.append(similarity(out, DIGITS[i] / 255.0))
        cy, cx = center_of_mass(out)
        assert abs(cy - 13.5) < 1.5 and abs(cx - 13.5) < 1.5
        rows, cols = np.flatnonzero(out.any(1)), np.flatnonzero(out.any(0))
        assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 <= 22  # fitted into 20x20 (+ resampling fringe)
    assert np.median(sims) > 0.75  # pixel-level closeness; the model-level check is in test_handler.py


def test_position_and_size_do_not_change_the_result():
    outs = [preprocess.mnist_digit(paper(DIGITS[3], s, b, t, x))
            for s, b, t, x in [(100, 50, 0, 0), (100, 50, 50, 50), (300, 200, 20, 90)]]  # fmt: skip
    assert similarity(outs[0], outs[1]) > 0.99
    assert similarity(outs[0], outs[2]) > 0.9


def test_bar_is_centred_and_scaled_to_20_pixels():
    img = Image.new("L", (300, 120), 255)
    ImageDraw.Draw(img).rectangle([40, 10, 52, 110], fill=0)  # a tall "1" near the left edge
    out = preprocess.mnist_digit(np.asarray(img))
    rows = np.flatnonzero(out.max(1) > 0.5)
    assert 18 <= rows[-1] - rows[0] + 1 <= 21
    cy, cx = center_of_mass(out)
    assert abs(cy - 13.5) < 1 and abs(cx - 13.5) < 1


def test_colour_alpha_grey_paper_and_formats_all_decode_to_the_same_digit():
    gray = paper(DIGITS[7], 120, 80, 20, 20)
    reference = preprocess.mnist_digit(gray)
    rgb = Image.merge("RGB", [Image.fromarray(gray)] * 3)
    blue_ink = np.stack([gray, gray, np.full_like(gray, 255)], -1)  # blue pen on white
    alpha = np.zeros((120, 120, 4), np.uint8)  # black ink on a transparent background
    alpha[..., 3] = 255 - gray
    greyish = (gray.astype(int) * 0.6 + 80).astype(np.uint8)  # grey paper, dark grey ink
    variants = {
        "rgb-jpeg": encode(rgb, "JPEG"),
        "blue-ink": encode(Image.fromarray(blue_ink)),
        "transparent": encode(Image.fromarray(alpha, "RGBA")),
        "grey-paper": encode(Image.fromarray(greyish)),
        "bmp": encode(Image.fromarray(gray), "BMP"),
        "gif": encode(Image.fromarray(gray), "GIF"),
        "webp": encode(Image.fromarray(gray), "WEBP"),
        "tiff": encode(Image.fromarray(gray), "TIFF"),
    }
    for name, data in variants.items():
        img = preprocess.decode(data)
        out = preprocess.prepare(img, "mnist-digit", 0.0, 1.0)[0]
        assert similarity(out, reference) > 0.9, name


def test_mnist_digits_pass_through_unchanged():
    assert np.array_equal(preprocess.mnist_digit(DIGITS[0]), DIGITS[0] / np.float32(255))


def test_fashion_mode_inverts_light_backgrounds_and_resizes():
    img = np.full((56, 56), 255, np.uint8)
    img[10:40, 20:30] = 0
    out = preprocess.fashion(img)
    assert out.shape == (28, 28) and out[12, 12] > 0.9 and out[0, 0] == 0


def test_blank_page_gives_blank_input():
    assert preprocess.mnist_digit(np.full((50, 50), 255, np.uint8)).max() == 0


@pytest.mark.parametrize("data,status,message", [
    (b"", 400, "empty"),
    (b"hello, not an image", 415, "not an image"),
    (encode(Image.new("L", (100, 100), 255))[:60], 400, "truncated"),
    (encode(Image.new("L", (5000, 4000), 255)), 413, "too large"),
])  # fmt: skip
def test_bad_bytes_raise_input_errors(data, status, message):
    with pytest.raises(InputError) as e:
        preprocess.decode(data)
    assert e.value.status == status and message in e.value.message


def test_softmax_and_topk():
    probs = preprocess.softmax(np.log(np.array([0.1, 0.7, 0.2])))
    assert np.allclose(probs, [0.1, 0.7, 0.2])
    r = preprocess.top_k(probs, ["a", "b", "c"], 2)
    assert r["label"] == "b" and [t["label"] for t in r["topk"]] == ["b", "c"]


def general(data: bytes, mode: str, mean: float, std: float) -> np.ndarray:
    return preprocess.prepare(preprocess.decode(data), mode, mean, std)


def test_normaliser_table_is_prepare_exactly():
    mean, std = 0.1307, 0.3081
    every = np.arange(256, dtype=np.uint8).reshape(16, 16)
    expected = ((every.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
    assert np.array_equal(preprocess.normaliser(mean, std)[every], expected)


@pytest.mark.parametrize("mode", ["mnist-digit", "fashion"])
def test_fast_path_gives_the_general_paths_pixels(mode):
    mean, std = 0.1307, 0.3081
    table = preprocess.normaliser(mean, std)
    pngs = [encode(Image.fromarray(d)) for d in DIGITS[:200]]
    pngs.append(encode(Image.fromarray(255 - DIGITS[0])))  # light background
    taken = 0
    for data in pngs:
        fast = preprocess.fast_prepare(data, mode, table)
        if fast is None:
            continue
        taken += 1
        slow = general(data, mode, mean, std)
        assert fast.dtype == slow.dtype and fast.shape == slow.shape == (1, 28, 28)
        assert np.array_equal(fast, slow)
    assert taken == len(pngs) - (mode == "mnist-digit")  # ink on paper is cropped and centred by the general path


def with_chunk(data: bytes, kind: bytes, payload: bytes) -> bytes:
    """The PNG with one more chunk right after IHDR."""
    import struct
    import zlib

    chunk = struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    return data[:33] + chunk + data[33:]


DIGIT_PNG = encode(Image.fromarray(DIGITS[0]))


@pytest.mark.parametrize("name,data", [
    ("jpeg", encode(Image.fromarray(DIGITS[0]), "JPEG")),
    ("rgb", encode(Image.fromarray(DIGITS[0]).convert("RGB"))),
    ("palette", encode(Image.fromarray(DIGITS[0]).convert("P"))),
    ("16-bit", encode(Image.fromarray(DIGITS[0].astype(np.uint16) * 257))),
    ("other size", encode(Image.fromarray(DIGITS[0]).resize((27, 27)))),
    ("transparency", with_chunk(DIGIT_PNG, b"tRNS", b"\x00\x00")),
    ("exif", with_chunk(DIGIT_PNG, b"eXIf", b"MM\x00*\x00\x00\x00\x08\x00\x00")),
    ("bad crc", DIGIT_PNG[:-20] + bytes([DIGIT_PNG[-20] ^ 1]) + DIGIT_PNG[-19:]),
    ("truncated", DIGIT_PNG[:60]),
])  # fmt: skip
def test_fast_path_leaves_everything_else_to_pillow(name, data):
    assert preprocess.fast_prepare(data, "mnist-digit", preprocess.normaliser(0.0, 1.0)) is None, name


def test_fast_path_keeps_inert_chunks():
    data = with_chunk(DIGIT_PNG, b"tEXt", b"Software\x00torchship")
    fast = preprocess.fast_prepare(data, "mnist-digit", preprocess.normaliser(0.0, 1.0))
    assert fast is not None and np.array_equal(fast, general(data, "mnist-digit", 0.0, 1.0))
