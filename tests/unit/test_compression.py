"""Request and response compression on the inference route (handlers/oip/compression.py): gzip and deflate (zlib and
raw) bodies, the limit on what a body decompresses to, and Accept-Encoding's weights."""

import gzip
import zlib

import pytest

from torchship.handlers.oip.compression import compress, decompress, preferred
from torchship.handlers.protocol.v2 import ProtocolError

BODY = b'{"inputs": []}' * 100


@pytest.mark.parametrize(
    "coding,data",
    [("gzip", gzip.compress(BODY)), ("deflate", zlib.compress(BODY)), ("deflate", zlib.compress(BODY, wbits=-15))],
    ids=["gzip", "zlib deflate", "raw deflate"],
)
def test_a_compressed_body_decompresses_to_what_was_sent(coding, data):
    assert decompress(data, coding, 1 << 20) == BODY


def test_a_bomb_is_refused_at_the_limit_without_inflating_the_rest():
    bomb = gzip.compress(bytes(200 << 20))  # 200 MiB of zeros in about 200 KiB
    assert len(bomb) < 1 << 20
    with pytest.raises(ProtocolError) as e:
        decompress(bomb, "gzip", 1 << 20)
    assert e.value.status == 413 and "more than the 1048576-byte limit" in e.value.message


@pytest.mark.parametrize(
    "data,words",
    [(b"not gzip at all", "not gzip"), (gzip.compress(BODY, mtime=0)[:-20], "truncated")],
    ids=["not gzip", "truncated"],
)
def test_a_body_that_is_not_what_it_says_is_a_400(data, words):
    with pytest.raises(ProtocolError) as e:
        decompress(data, "gzip", 1 << 20)
    assert e.value.status == 400 and words in e.value.message


@pytest.mark.parametrize(
    "accept,chosen",
    [
        (None, None),
        (b"gzip", "gzip"),
        (b"br, deflate", "deflate"),
        (b"gzip;q=0.5, deflate;q=0.8", "deflate"),
        (b"gzip;q=0", None),
        (b"identity", None),
        (b"GZIP, x;q=1", "gzip"),
    ],
)
def test_accept_encoding_picks_the_coding_the_client_weighs_highest(accept, chosen):
    assert preferred(accept) == chosen


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_an_answer_compresses_in_the_coding_a_client_decodes(coding):
    assert (gzip.decompress if coding == "gzip" else zlib.decompress)(compress(BODY, coding)) == BODY
