"""The image recipes: digits on paper of varied size, position, colour and transparency; the torchvision
presets for RGB models; and what a hostile upload must not be able to do."""

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from torchship.handlers.model import images as preprocess
from torchship.handlers.model.errors import InputError
from torchship.handlers.model.images import Preprocessor
from torchship.handlers.model.responses import softmax, top_k
from torchship.serve.samples import held_out_digits

from helpers import card, paper


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


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
    outs = [
        preprocess.mnist_digit(paper(DIGITS[3], s, b, t, x))
        for s, b, t, x in [(100, 50, 0, 0), (100, 50, 50, 50), (300, 200, 20, 90)]
    ]
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
    prep = Preprocessor(card(mean=0.0, std=1.0))
    for name, data in variants.items():
        out = prep.from_bytes(data)[0]
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


@pytest.mark.parametrize("shade", [0, 128, 255])
@pytest.mark.parametrize("side", [28, 300])
def test_a_blank_image_is_refused_for_digit_models_not_for_photo_models(shade, side):
    data = encode(Image.new("L", (side, side), shade))
    for recipe in ("mnist-digit", "fashion"):
        with pytest.raises(InputError) as e:
            Preprocessor(card(preprocess=recipe)).from_bytes(data)
        assert e.value.status == 422 and "blank" in e.value.message
    rgb = card(input_shape=(3, 32, 32), mean=0.5, std=0.25, preprocess="resize")
    assert Preprocessor(rgb).from_bytes(data).shape == (3, 32, 32)  # a uniform sky is still a photo


@pytest.mark.parametrize(
    "data,status,message",
    [
        (b"", 400, "empty"),
        (b"hello, not an image", 415, "not an image"),
        (encode(Image.new("L", (100, 100), 255))[:60], 400, "truncated"),
        (encode(Image.new("L", (2049, 2049), 255)), 413, "too large"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", 415, "accepted format"),
        (b"\x00\x00\x01\x00" + bytes(60), 415, "accepted format"),  # an .ico header: Pillow reads it, we do not
    ],
)
def test_bad_bytes_raise_input_errors(data, status, message):
    with pytest.raises(InputError) as e:
        preprocess.decode(data)
    assert e.value.status == status and message in e.value.message


def test_softmax_and_topk():
    probs = softmax(np.log(np.array([0.1, 0.7, 0.2])))
    assert np.allclose(probs, [0.1, 0.7, 0.2])
    r = top_k(probs, ["a", "b", "c"], 2)
    assert r["label"] == "b" and [t["label"] for t in r["topk"]] == ["b", "c"]


def general(data: bytes, mode: str, mean: float, std: float) -> np.ndarray:
    return Preprocessor(card(preprocess=mode, mean=mean, std=std)).from_image(preprocess.decode(data))


def test_normaliser_table_is_prepare_exactly():
    mean, std = 0.1307, 0.3081
    every = np.arange(256, dtype=np.uint8).reshape(16, 16)
    expected = ((every.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
    assert np.array_equal(preprocess.normaliser(mean, std)[every], expected)


@pytest.mark.parametrize(
    ("mean", "std"),
    [((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ((0.0,) * 3, (1.0,) * 3), ((0.5,) * 3, (0.5,) * 3)],
)
def test_photos_are_normalised_as_the_tables_say_bit_for_bit(mean, std):
    prep = Preprocessor(card(input_shape=(3, 16, 16), mean=mean, std=std, preprocess="resize", output_kind="logits"))
    every = np.stack([np.arange(256, dtype=np.uint8).reshape(16, 16)] * 3, -1)
    every[..., 1] = every[..., 1].T  # each channel in its own order: a mixed-up channel would show
    tables = [preprocess.normaliser(m, s) for m, s in zip(mean, std)]
    out = prep.scaled(every)
    assert out.dtype == np.float32 and out.shape == (3, 16, 16)
    assert all(np.array_equal(out[i], t[every[..., i]]) for i, t in enumerate(tables))


def test_a_letterbox_is_the_picture_at_the_top_left_on_black():
    c = card(input_shape=(3, 40, 40), mean=RGB.mean, std=RGB.std, preprocess="letterbox", output_kind="logits")
    prep, img = Preprocessor(c), photo(20, 10)  # fits as 40 x 20: the right half is padding
    out = prep.from_image(img)
    picture = np.asarray(img.resize((20, 40), Image.Resampling.BILINEAR))
    black = [preprocess.normaliser(m, s)[0] for m, s in zip(c.mean, c.std)]
    assert out.sizes == ((20, 10),) and out.shape == (3, 40, 40)
    assert np.array_equal(out[:, :, :20], prep.scaled(picture))
    assert all(np.all(out[i, :, 20:] == b) for i, b in enumerate(black)) and len(set(black)) == 3


@pytest.mark.parametrize("mode", ["mnist-digit", "fashion"])
def test_fast_path_gives_the_general_paths_pixels(mode):
    mean, std = 0.1307, 0.3081
    prep = Preprocessor(card(preprocess=mode, mean=mean, std=std))
    pngs = [encode(Image.fromarray(d)) for d in DIGITS[:200]]
    pngs.append(encode(Image.fromarray(255 - DIGITS[0])))  # light background
    taken = 0
    for data in pngs:
        fast = prep.fast(data)
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


@pytest.mark.parametrize(
    "name,data",
    [
        ("jpeg", encode(Image.fromarray(DIGITS[0]), "JPEG")),
        ("rgb", encode(Image.fromarray(DIGITS[0]).convert("RGB"))),
        ("palette", encode(Image.fromarray(DIGITS[0]).convert("P"))),
        ("16-bit", encode(Image.fromarray(DIGITS[0].astype(np.uint16) * 257))),
        ("other size", encode(Image.fromarray(DIGITS[0]).resize((27, 27)))),
        ("transparency", with_chunk(DIGIT_PNG, b"tRNS", b"\x00\x00")),
        ("exif", with_chunk(DIGIT_PNG, b"eXIf", b"MM\x00*\x00\x00\x00\x08\x00\x00")),
        ("bad crc", DIGIT_PNG[:-20] + bytes([DIGIT_PNG[-20] ^ 1]) + DIGIT_PNG[-19:]),
        ("truncated", DIGIT_PNG[:60]),
    ],
)
def test_fast_path_leaves_everything_else_to_pillow(name, data):
    assert Preprocessor(card(mean=0.0, std=1.0)).fast(data) is None, name


def test_fast_path_keeps_inert_chunks():
    data = with_chunk(DIGIT_PNG, b"tEXt", b"Software\x00torchship")
    fast = Preprocessor(card(mean=0.0, std=1.0)).fast(data)
    assert fast is not None and np.array_equal(fast, general(data, "mnist-digit", 0.0, 1.0))


def photo(h: int = 300, w: int = 400, seed: int = 0) -> Image.Image:
    """A smooth RGB picture (random colours, upsampled) with real structure for resampling to act on."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    return small.resize((w, h), Image.Resampling.BICUBIC)


RGB = card(
    input_shape=(3, 224, 224),
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    preprocess="resize-crop",
    output_kind="logits",
    labels=("a", "b"),
)


@pytest.mark.parametrize("size", [(300, 400), (400, 300), (256, 256), (200, 180)])
def test_resize_crop_is_torchvisions_classification_preset(size):
    from torchvision import transforms

    img = photo(*size)
    tv = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(RGB.mean, RGB.std),
        ]
    )
    ours = Preprocessor(RGB).from_image(img)
    assert RGB.resize == 256 and ours.shape == (3, 224, 224) and ours.dtype == np.float32
    assert np.abs(ours - tv(img).numpy()).max() < 1e-5


def test_resize_is_torchvisions_resize():
    from torchvision import transforms

    c = card(input_shape=(3, 64, 96), mean=0.5, std=0.5, preprocess="resize", output_kind="logits")
    img = photo(120, 100)
    tv = transforms.Compose(
        [transforms.Resize((64, 96)), transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)]
    )
    assert np.abs(Preprocessor(c).from_image(img) - tv(img).numpy()).max() < 1e-5


def test_grey_and_colour_meet_the_models_channels():
    grey = photo().convert("L")
    rgb_in = Preprocessor(RGB).from_image(grey)
    assert np.array_equal(rgb_in[0] * RGB.std[0] + RGB.mean[0], rgb_in[1] * RGB.std[1] + RGB.mean[1]) or np.allclose(
        rgb_in[0] * RGB.std[0] + RGB.mean[0], rgb_in[1] * RGB.std[1] + RGB.mean[1], atol=1e-6
    )
    grey_model = card(input_shape=(1, 32, 32), mean=0.5, std=0.5, preprocess="resize", output_kind="logits")
    assert Preprocessor(grey_model).from_image(photo()).shape == (1, 32, 32)


def test_transparency_is_composited_onto_white_for_colour_models_too():
    c = card(input_shape=(3, 8, 8), mean=0.0, std=1.0, preprocess="resize", output_kind="logits")
    clear = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    assert np.allclose(Preprocessor(c).from_image(clear), 1.0)  # white paper shows through


def test_exif_orientation_is_applied():
    c = card(input_shape=(3, 40, 20), mean=0.0, std=1.0, preprocess="resize", output_kind="logits")
    tall = np.zeros((40, 20, 3), np.uint8)
    tall[:10] = 255  # white top
    upright = Image.fromarray(tall)
    sideways = upright.rotate(90, expand=True)  # what a phone stores, with EXIF orientation 6 (rotate 270 to view)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    sideways.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    out = Preprocessor(c).from_bytes(buf.getvalue())
    assert out[:, :10].mean() > 0.8 and out[:, 30:].mean() < 0.2


def test_a_big_jpeg_is_decoded_at_reduced_scale_and_still_read():
    img = photo(3000, 4000)  # 12 megapixels, as a phone takes them: over the pixel cap at full size
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    small = preprocess.decode(buf.getvalue(), draft=(512, 512))
    assert small.size[0] < 4000 and min(small.size) >= 512
    assert Preprocessor(RGB).from_bytes(buf.getvalue()).shape == (3, 224, 224)
    with pytest.raises(InputError) as e:
        preprocess.decode(buf.getvalue())  # no draft: the full 12 MP would be decoded, which the cap refuses
    assert e.value.status == 413


@pytest.mark.parametrize("mode", ["RGBA", "I;16", "L"])
def test_a_huge_declared_size_is_refused_before_any_pixel_is_decoded(mode):
    """The issue's attack: a small PNG declaring 4000x3999. Its pixel data is cut off here, so a decoder that
    ran first would report a truncated file; the cap must answer before that."""
    data = encode(Image.new(mode, (4000, 3999)))
    with pytest.raises(InputError) as e:
        Preprocessor(card()).from_bytes(data[:200])
    assert e.value.status == 413 and "4000x3999" in e.value.message


def test_the_pixel_cap_is_configurable_and_fits_large_models():
    data = encode(Image.new("L", (100, 100), 0))
    with pytest.raises(InputError):
        Preprocessor(card(), max_pixels=5000).from_bytes(data)
    big = card(input_shape=(3, 2048, 2048), mean=0.5, std=0.5, preprocess="resize", output_kind="logits")
    assert Preprocessor(big).max_pixels == 4 * 2048 * 2048 > preprocess.MAX_PIXELS


def test_sixteen_bit_and_large_digits_read_like_their_eight_bit_forms():
    page = paper(DIGITS[7], 1800, 900, 400, 500)  # large enough to be reduced before the digit recipe
    prep = Preprocessor(card(mean=0.0, std=1.0))
    ref = prep.from_bytes(encode(Image.fromarray(page)))[0]
    sixteen = prep.from_bytes(encode(Image.fromarray(page.astype(np.uint16) * 257)))[0]
    assert similarity(sixteen, ref) > 0.98
    unreduced = prep.from_bytes(encode(Image.fromarray(paper(DIGITS[7], 1000, 500, 222, 277))))[0]
    assert similarity(ref, unreduced) > 0.95


def test_arrays_in_every_layout_apps_hold():
    prep = Preprocessor(card(mean=0.0, std=1.0))
    a = prep.from_item(DIGITS[3])
    assert np.array_equal(prep.from_item(DIGITS[3][None]), a)  # (1, H, W) as torch holds it
    assert np.array_equal(prep.from_item(DIGITS[3] / 255.0), a)  # floats in [0, 1]
    with pytest.raises(InputError):
        prep.from_item(np.zeros((2, 2, 2, 2)))
