"""Requests a hostile or confused client sends, and the JSON 4xx each must get; shared by every served format."""

import base64
import io
import json

from PIL import Image

from torchship.serve.samples import held_out_digits, png


def encode(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def multipart(*files: tuple[str, bytes]) -> tuple[bytes, str]:
    b = "torchshipboundary"
    parts = [
        f'--{b}\r\nContent-Disposition: form-data; name="{n}"; filename="{n}.png"\r\nContent-Type: image/png'
        f"\r\n\r\n".encode()
        + data
        + b"\r\n"
        for n, data in files
    ]
    return b"".join(parts) + f"--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}"


DIGIT = png(held_out_digits()[0][0])
TWO_FILES = multipart(("data", DIGIT), ("other", DIGIT))
HOSTILE = [  # (name, body, content type, extra headers, status, words the message must hold)
    (
        "eps reaches no ghostscript",
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
        "application/postscript",
        {},
        415,
        "accepted format",
    ),
    ("ico is not on the list", encode(Image.new("RGB", (16, 16)), "ICO"), "image/x-icon", {}, 415, "accepted format"),
    ("rgba pixel bomb", encode(Image.new("RGBA", (4000, 3999))), "image/png", {}, 413, "4000x3999"),
    ("16-bit pixel bomb", encode(Image.new("I;16", (4000, 3999))), "image/png", {}, 413, "4000x3999"),
    ("blank picture", encode(Image.new("L", (28, 28), 0)), "image/png", {}, 422, "blank"),
    ("blank page", encode(Image.new("RGB", (300, 200), "white"), "JPEG"), "image/jpeg", {}, 422, "blank"),
    ("data null", b'{"data": null}', "application/json", {}, 400, "got null"),
    ("data number", b'{"data": 12}', "application/json", {}, 400, "base64 string"),
    ("data empty", b'{"data": ""}', "application/json", {}, 400, "empty"),
    ("json list", b"[1, 2, 3]", "application/json", {}, 400, "one image"),
    ("two files", TWO_FILES[0], TWO_FILES[1], {}, 400, "2 files"),
    ("url-encoded form", b"a=b&c=d", "application/x-www-form-urlencoded", {}, 400, "curl -T"),
    ("huge topk", DIGIT, "image/png", {"X-TopK": "9" * 5000}, 400, "5000 characters"),
    ("zero topk", DIGIT, "image/png", {"X-TopK": "0"}, 400, "between 1 and 10"),
    ("text", b"hello", "text/plain", {}, 400, "base64"),
    ("empty", b"", "image/png", {}, 400, "empty"),
    ("truncated png", DIGIT[:60], "image/png", {}, 400, "truncated"),
    (
        "not base64 image",
        json.dumps({"data": base64.b64encode(b"not an image").decode()}).encode(),
        "application/json",
        {},
        415,
        "accepted format",
    ),
]
